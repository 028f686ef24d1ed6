"""Forward time and peak memory of each registered network at one realistic patch size.

Each (network, reference) runs in its own subprocess so that its peak resident set size (RSS) is its
own: the table shows the parameter count, the RSS after building the network, the peak RSS over the
timed forwards and the median forward time (``torch.inference_mode``, batch 1, after one warm-up
run). MONAI's own ``SwinUNETR`` runs with the same configuration and input as ``swin_unetr``, for
comparison (the wrapper only re-expresses MONAI's forward to expose the taps).

Usage::

    python benchmarks/networks.py                      # every network in PATCHES that is registered
    python benchmarks/networks.py --networks transunet swin_unetr monai_swin_unetr --repeats 5
    python benchmarks/networks.py --device cuda        # on a GPU (peak memory from CUDA stats)

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# network -> (reference label, patch size): the reference input of the paper or nnU-Net-typical
PATCHES: dict[str, tuple[str, tuple[int, ...]]] = {
    "transunet": ("R50-ViT-B_16", (224, 224)),
    "swin_unetr": ("BTCV", (96, 96, 96)),
    "monai_swin_unetr": ("BTCV", (96, 96, 96)),  # MONAI's SwinUNETR, same config as swin_unetr/BTCV
    "transunet3d": ("paper_encoder", (128, 128, 128)),
    "unet": ("3d_fullres", (128, 128, 128)),
    "stunet": ("B", (128, 128, 128)),
    "dformer": ("paper", (64, 128, 128)),
    "cellvta": ("L", (256, 256)),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(name: str, repeats: int, device: str, threads: int) -> dict:
    """Build one network, time ``repeats`` forwards; returns the measurements (in this process)."""
    import torch

    from medseg.networks import count_parameters, create_network, network_entry

    torch.set_num_threads(threads)
    label, size = PATCHES[name]
    if name == "monai_swin_unetr":
        from monai.networks.nets import SwinUNETR

        config = dict(network_entry("swin_unetr").references[label])
        spatial_dims = config.pop("spatial_dims")
        net = SwinUNETR(config.pop("in_channels"), config.pop("out_channels"), spatial_dims=spatial_dims, **config)
        in_channels = net.encoder1.layer.conv1.conv.in_channels
    else:
        net = create_network(name, **network_entry(name).references[label])
        in_channels = net.in_channels
    net = net.to(device).eval()
    rss_built = _rss_mib()
    x = torch.randn(1, in_channels, *size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run is a warm-up
                times.append(time.perf_counter() - start)
    result = {
        "network": name,
        "reference": label,
        "patch": "x".join(map(str, size)),
        "parameters": count_parameters(net),
        "rss_built_mib": rss_built,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
    }
    if device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="*", help="subset of: " + ", ".join(PATCHES))
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up (median reported)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per network")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.repeats, args.device, args.threads)))
        return 0

    from medseg.networks import list_networks

    registered = set(list_networks()) | {"monai_swin_unetr"}
    names = args.networks or [n for n in PATCHES if n in registered]
    rows = []
    for name in names:
        if name not in PATCHES:
            print(f"skipping {name}: no benchmark patch size in PATCHES", file=sys.stderr)
            continue
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--repeats",
            str(args.repeats),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            rows.append({"network": name, "error": f"timeout after {args.timeout:.0f} s"})
            continue
        if done.returncode:
            rows.append({"network": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"done {name}", file=sys.stderr)
    print(table(rows, args))
    return 0


def table(rows: list[dict], args) -> str:
    import torch

    memory = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    lines = [
        f"device {args.device}, torch {torch.__version__}, threads {args.threads}, batch 1, "
        f"median of {args.repeats} forwards after 1 warm-up, inference_mode",
        "",
        f"| network | reference | patch | parameters | RSS built MiB | {memory} | median s | min s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['network']} | | | | | | error: {r['error']} | |")
            continue
        peak = r.get("peak_cuda_mib", r["peak_rss_mib"])
        lines.append(
            f"| {r['network']} | {r['reference']} | {r['patch']} | {r['parameters']:,} | "
            f"{r['rss_built_mib']:.0f} | {peak:.0f} | {r['median_s']:.3f} | {r['min_s']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
