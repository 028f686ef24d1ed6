"""What each output of ``medseg predict`` costs next to the network: ``python benchmarks/writers.py``.

On the bundled sample (``medseg/samples/hippocampus_mr``, a real 3D MR DICOM series) with the
bundled ``hippocampus`` model, one prediction, then each writer of :func:`medseg.outputs.write_outputs`
alone (``nifti``, ``tiff``, ``seg``, ``rtstruct``, ``json``, ``png``, ``mip``) ``--repeat`` times
into a temporary folder, interleaved, and the default set (``nifti,seg,json,png``) together.
Prints the machine, the prediction's own stage times and one table: min and median ms per writer
and its share of the prediction (read + predict). ``--threads`` sets PyTorch's threads (default 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "medseg" / "samples" / "hippocampus_mr"
WRITERS = ("nifti", "tiff", "seg", "rtstruct", "json", "png", "mip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from medseg.inference import Predictor
    from medseg.io import read_image
    from medseg.outputs import DEFAULT_FORMATS, write_outputs

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    image = read_image(SAMPLE)
    read_s = time.perf_counter() - start
    predictor = Predictor("hippocampus")
    predictor.predict(image)  # warm: runtime loaded and compiled
    start = time.perf_counter()
    prediction = predictor.predict(image)
    predict_s = time.perf_counter() - start
    card = predictor.package.card
    sets = [(name, (name,)) for name in WRITERS] + [("default (" + ",".join(DEFAULT_FORMATS) + ")", DEFAULT_FORMATS)]
    times: dict[str, list[float]] = {name: [] for name, _ in sets}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeat + 1):  # the first round warms imports and fonts
            for name, formats in sets:
                out = Path(tmp) / f"{run}-{name[:7]}"
                start = time.perf_counter()
                write_outputs(prediction, image, card, out, formats=formats, stem="case")
                if run:
                    times[name].append(time.perf_counter() - start)

    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{load[0]:.1f} {load[1]:.1f}; torch {torch.__version__}, {args.threads} thread(s); "
        f"{args.repeat} runs per writer, interleaved"
    )
    print(f"image {tuple(image.shape)}; read {read_s * 1e3:.0f} ms, predict {predict_s * 1e3:.0f} ms")
    print("  " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in prediction.timings.items()))
    base = read_s + predict_s
    print()
    print("| outputs | min ms | median ms | share of read + predict |")
    print("|---|---|---|---|")
    for name, _ in sets:
        values = times[name]
        median = statistics.median(values)
        print(f"| {name} | {min(values) * 1e3:.1f} | {median * 1e3:.1f} | {median / base:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
