"""Time series discovery and volume reading on the real DICOM exports (CPU, single process).

For each input: the number of series and files, ``find_series`` time (headers only), and the
median time to read every series (pixel decoding, sorting, geometry checks, resampling), plus
megavoxels per second. Compare against dcm2niix or SimpleITK's ImageSeriesReader by hand.

Usage: ``python benchmarks/bench_io_read.py [--repeats 3] [--data ../shared/data]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from medseg.io import find_series

INPUTS = [
    "dicom/hippocampus_crop_study1",
    "dicom/mr_brain_study3_export",
    "dicom/ct_jpeg2000_series",
    "dicom/dcm_qa_ts/In",
    "dicom/dcm_qa_nih/In",
    "dicom/dcm_qa_ct_gantry_tilt/In",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    default = Path(os.environ.get("MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default)
    args = parser.parse_args()
    print(f"{'input':36s} {'series':>6s} {'files':>6s} {'find s':>8s} {'read s':>8s} {'Mvox/s':>8s}")
    for name in INPUTS:
        path = args.data / name
        if not path.exists():
            print(f"{name:36s} (missing)")
            continue
        find_times, read_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            series = find_series(path)
            find_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            voxels = sum(info.read().array.size for info in series)
            read_times.append(time.perf_counter() - start)
        files = sum(info.instance_count for info in series)
        read = statistics.median(read_times)
        print(
            f"{name:36s} {len(series):6d} {files:6d} {statistics.median(find_times):8.3f} "
            f"{read:8.3f} {voxels / read / 1e6:8.2f}"
        )


if __name__ == "__main__":
    main()
