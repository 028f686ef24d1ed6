"""Forward + backward time of each training loss on one batch of network outputs.

The losses see the same ``NetworkOutput`` (logits plus native deep-supervision logits and decoder /
encoder features from the hippocampus U-Net, ``configs/hippocampus/unet.yaml``) and a real-shaped
label; the table gives the median time of ``loss(output, label).backward()`` over the repeats,
the network's own forward + backward for scale, and the loss's own parameters (DSD side heads).

Usage::

    python benchmarks/losses.py                       # batch 2, 32x48x32 patch, 1 thread
    python benchmarks/losses.py --patch 40 56 40 --repeats 10 --threads 2

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medseg.losses import build_loss
from medseg.networks import create_network

LOSSES = [
    ("dice_ce", {}, {"deep_supervision": False}),
    ("dice_ce + nnU-Net deep supervision", {}, {"deep_supervision": True}),
    ("dice_focal", {}, {"deep_supervision": False}),
    ("focal_tversky", {}, {"deep_supervision": False}),
    ("mip (z)", {"axis": "z"}, {"deep_supervision": False}),
    ("mip (multi)", {"axis": "multi"}, {"deep_supervision": False}),
    ("ftl_mip", {}, {"deep_supervision": False}),
    ("dice_ce + DSD (deconv heads)", {}, {"dsd": {"upsample": "deconv"}}),
    ("dice_ce + DSD (trilinear heads)", {}, {"dsd": {"upsample": "trilinear"}}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 48, 32])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patch = tuple(args.patch)
    network = create_network(
        "unet",
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        filters=(16, 32, 64, 128),
        strides=(1, 2, 2, 2),
        deep_supervision=2,
    )
    x = torch.randn(args.batch, 1, *patch)
    label = torch.randint(0, 3, (args.batch, 1, *patch)).float()

    def timed(step) -> float:
        step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    def network_step():
        network.zero_grad()
        out = network(x, features=True)
        (out.logits.sum() + sum(d.sum() for d in out.deep_supervision)).backward()

    rows = [("network forward + backward (for scale)", timed(network_step), 0)]
    for title, kwargs, options in LOSSES:
        name = title.split(" ")[0]
        loss = build_loss(name, network, patch, kwargs, **options)
        with torch.no_grad():
            fixed = network(x, features=True)
        features = [
            t.detach().requires_grad_() for t in [fixed.logits, *fixed.deep_supervision, *fixed.decoder, *fixed.encoder]
        ]

        def loss_step(loss=loss, features=features, fixed=fixed):
            k, ds = 1, len(fixed.deep_supervision)
            output = type(fixed)(
                logits=features[0],
                deep_supervision=features[k : k + ds],
                decoder=features[k + ds : k + ds + len(fixed.decoder)],
                encoder=features[k + ds + len(fixed.decoder) :],
            )
            loss.zero_grad()
            loss(output, label).backward()

        rows.append((title, timed(loss_step), sum(p.numel() for p in loss.parameters())))

    print(
        f"batch {args.batch}, patch {'x'.join(map(str, patch))}, {args.threads} thread(s), median of {args.repeats}\n"
    )
    print("| loss | forward + backward (ms) | own parameters |")
    print("| --- | ---: | ---: |")
    for title, ms, params in rows:
        print(f"| {title} | {ms:.1f} | {params:,} |")


if __name__ == "__main__":
    main()
