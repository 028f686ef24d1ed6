"""Parameters and multiply-accumulates of the D-Former and STU-Net reference configurations.

Counted on the ``meta`` device (nothing is allocated, so STU-Net-H costs nothing) with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and attention; norms,
activations and interpolation are not counted). Published figures for comparison: STU-Net README
"TFLOPs" at 128^3 (which are multiply-accumulates) 0.13 / 0.51 / 3.81 / 12.60; D-Former about
52 GMACs at 64 x 128 x 128 (docs/architectures.md, an estimate).

With ``--time DEVICE`` (e.g. ``cuda``) each configuration named in ``--configs`` is also run
forward and backward once for warm-up and ``--repeats`` times timed, under bf16 autocast, printing
the median seconds per step and the peak memory (CUDA only).

Usage: ``python benchmarks/bench_dformer_stunet.py [--time cuda] [--configs dformer:paper stunet:B]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.networks import count_parameters, create_network, network_entry

PATCH = {"dformer": (64, 128, 128), "stunet": (128, 128, 128)}
CONFIGS = ["dformer:paper", "dformer:paper_ds", "stunet:S", "stunet:B", "stunet:L", "stunet:H"]


def measure_macs(name: str, label: str, patch) -> tuple[int, float]:
    """(parameters, multiply-accumulates) of one forward pass of batch 1 at ``patch``, on ``meta``."""
    with torch.device("meta"):
        net = create_network(name, **network_entry(name).references[label]).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.empty(1, net.in_channels, *patch))
    return count_parameters(net), counter.get_total_flops() / 2


def time_step(name: str, label: str, patch, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward (bf16 autocast, batch 1) and peak GiB (CUDA)."""
    net = create_network(name, **network_entry(name).references[label]).to(device).train()
    x = torch.randn(1, net.in_channels, *patch, device=device)
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out = net(x, features=True)
            loss = out.logits.float().mean() + sum(d.float().mean() for d in out.deep_supervision)
        loss.backward()
        net.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="name:reference pairs")
    parser.add_argument("--time", metavar="DEVICE", help="also time a training step on DEVICE")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    header = f"{'network':<18}{'patch':>16}{'parameters':>16}{'GMACs':>10}"
    if args.time:
        header += f"{'s/step':>10}{'peak GiB':>10}"
    print(header)
    for config in args.configs:
        name, label = config.split(":")
        patch = PATCH[name]
        params, macs = measure_macs(name, label, patch)
        row = f"{config:<18}{'x'.join(map(str, patch)):>16}{params:>16,}{macs / 1e9:>10.1f}"
        if args.time:
            seconds, peak = time_step(name, label, patch, args.time, args.repeats)
            row += f"{seconds:>10.3f}{peak:>10.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
