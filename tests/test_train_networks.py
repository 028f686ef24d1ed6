"""Every seed network trains through ``medseg train`` on real hippocampus cases and its exported
package segments a real case through ``medseg predict``: the 3D ones on 3D patches, the 2D
TransUNet on axial slices (a 2D patch), predicting the volume slice by slice.

Tiny configs (a few thousand parameters, 16^3-32^3 patches, 12 steps) so the suite stays fast; the
real-size configs are under ``configs/hippocampus/`` and their figures in the README leaderboard.
The loss must fall (last epoch below the first, fixed seed, deterministic) and the label map must
come back on the input's grid with both labels' ids only.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from conftest import shared_path

from medseg.cli import main
from medseg.io import read_image

NETWORKS = {
    "unet": ({"filters": [4, 8, 16], "strides": [1, 2, 2], "deep_supervision": 1}, [16, 16, 16]),
    "stunet": ({"channels": [4, 8, 16], "depths": [1, 1, 1], "pool_strides": [2, 2]}, [16, 16, 16]),
    "dformer": (
        {
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "patch_size": [2, 2, 2],
            "group_size": [2, 2, 2],
            "deep_supervision": True,
        },
        [16, 32, 16],
    ),
    "transunet3d": (
        {
            "img_size": [16, 16, 16],
            "filters": [4, 8, 16],
            "strides": [1, 2, 2],
            "deep_supervision": 1,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "mlp_dim": 32,
        },
        [16, 16, 16],
    ),
    "swin_unetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}, [32, 64, 32]),
    "transunet": (
        {
            "img_size": 32,
            "resnet_units": [1, 1, 1],
            "resnet_width": 32,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "mlp_dim": 32,
            "head_channels": 16,
            "decoder_channels": [16, 8, 8, 8],
        },
        [32, 48],
    ),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_seed_network_trains_and_its_package_predicts(name, tmp_path):
    dataset = shared_path("hippocampus")
    network, patch = NETWORKS[name]
    config = {
        "name": f"tiny_{name}",
        "data": {
            "dataset_dir": str(dataset),
            "data_card": "hippocampus",
            "max_cases": 6,
            "num_folds": 3,
            "patch_size": patch,
        },
        "network": {"name": name, "config": network},
        "loss": {"name": "dice_ce", "kwargs": {"include_background": False, "batch": True}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "scheduler": {"name": "poly", "warmup_iterations": 1},
        "training": {"epochs": 3, "iterations_per_epoch": 4, "batch_size": 2, "num_threads": 1, "seed": 0},
        "validation": {
            "patch_size": patch if len(patch) == 2 else [32, 64, 32],
            "every": 3,
            "max_cases": 1,
            "hd95": False,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    case = sorted((dataset / "imagesTr").glob("hippocampus_*.nii.gz"))[-1]
    out = tmp_path / "out"
    assert main(["predict", str(case), "--model", str(tmp_path / "run" / "model"), "--output", str(out)]) == 0
    label_map = read_image(next(out.rglob("*.nii.gz")))
    image = read_image(case)
    assert label_map.array.shape == image.array.shape
    np.testing.assert_allclose(label_map.affine, image.affine, atol=1e-4)
    assert set(np.unique(label_map.array)) <= {0, 1, 2}


def test_every_hippocampus_config_builds_its_network():
    """The real-size configs of the leaderboard parse, and each network builds (on the meta
    device) for its patch: 3D patches for the 3D networks, a 2D slice patch for the 2D TransUNet,
    each divisible by the network's input divisor."""
    from pathlib import Path

    import torch

    from medseg.networks import create_network
    from medseg.training.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "hippocampus").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"unet", "stunet", "dformer", "transunet3d", "transunet", "swin_unetr"}
    for path in configs:
        config = load_config(path)
        patch = tuple(config.data.patch_size)
        defaults = {"spatial_dims": len(patch), "in_channels": 1, "out_channels": 3}
        with torch.device("meta"):
            network = create_network(config.network.name, **{**defaults, **config.network.config})
        divisor = getattr(network, "input_divisor", (1,) * len(patch))
        assert len(divisor) == len(patch) and all(p % d == 0 for p, d in zip(patch, divisor)), path.name
