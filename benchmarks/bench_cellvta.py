"""Parameters (ViT / adapter / decoder / trainable) and multiply-accumulates of the CellVTA references.

Counted on the ``meta`` device (ViT-L is never allocated) with
``torch.utils.flop_counter.FlopCounterMode`` at 256 x 256, batch 1 (convolutions, matmuls and
attention; ``grid_sample`` in the deformable attention, norms and activations are not counted).
Figures to compare with (docs/architectures.md section 6, rebuilt layout): about 387.8M total =
ViT-L 303.35M + adapter 22.28M + decoders 62.12M, about 84.4M trainable.

With ``--time DEVICE`` (e.g. ``cuda``) each configuration is also run forward + backward once for
warm-up and ``--repeats`` times timed, under bf16 autocast, printing the median seconds per
training step and the peak memory (CUDA only).

Usage: ``python benchmarks/bench_cellvta.py [--configs S B L] [--time cuda] [--size 256]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.networks import count_parameters, create_network, network_entry


def measure(label: str, size: int) -> dict[str, float]:
    """Parameter split and GMACs of one forward of batch 1 at ``size`` x ``size``, on ``meta``."""
    with torch.device("meta"):
        net = create_network("cellvta", **network_entry("cellvta").references[label]).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.empty(1, net.in_channels, size, size))
    vit = count_parameters(net.vit)
    return dict(
        total=count_parameters(net),
        vit=vit,
        adapter=count_parameters(net.backbone) - vit,
        decoder=count_parameters(net.decoder),
        trainable=count_parameters(net, trainable_only=True),
        gmacs=counter.get_total_flops() / 2e9,
    )


def time_step(label: str, size: int, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward (bf16 autocast, batch 1) and peak GiB (CUDA)."""
    net = create_network("cellvta", **network_entry("cellvta").references[label]).to(device).train()
    x = torch.randn(1, net.in_channels, size, size, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out = net(x, features=True)
            loss = sum(t.float().mean() for t in (out.logits, out.nuclei_probability_logits, out.horizontal_vertical))
        loss.backward()
        net.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=["S", "B", "L"], help="reference labels")
    parser.add_argument("--size", type=int, default=256, help="square input size in pixels (multiple of 16)")
    parser.add_argument("--time", metavar="DEVICE", help="also time a training step on DEVICE")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    header = f"{'cellvta':<9}{'total':>14}{'ViT':>14}{'adapter':>13}{'decoder':>13}{'trainable':>13}{'GMACs':>9}"
    if args.time:
        header += f"{'s/step':>9}{'peak GiB':>10}"
    print(header)
    for label in args.configs:
        m = measure(label, args.size)
        row = (
            f"{label:<9}{m['total']:>14,}{m['vit']:>14,}{m['adapter']:>13,}{m['decoder']:>13,}"
            f"{m['trainable']:>13,}{m['gmacs']:>9.1f}"
        )
        if args.time:
            seconds, peak = time_step(label, args.size, args.time, args.repeats)
            row += f"{seconds:>9.3f}{peak:>10.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
