"""``medseg train`` end to end on a few real hippocampus cases with a tiny network: plan -> train ->
resume -> export, DSD, DDP under torchrun, and configuration / data errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import shared_path

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.io import read_image
from medseg.package import resolve_model
from medseg.preprocess import normalize_intensity
from medseg.training import Trainer, load_config
from medseg.training.config import apply_overrides
from medseg.training.trainer import LRSchedule

TINY = {
    "name": "tiny_hippocampus",
    "data": {"data_card": "hippocampus", "max_cases": 8, "num_folds": 4, "patch_size": [16, 16, 16]},
    "network": {"name": "unet", "config": {"filters": [4, 8, 16], "strides": [1, 2, 2], "deep_supervision": 1}},
    "loss": {"name": "dice_ce", "kwargs": {"include_background": False, "batch": True}},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "scheduler": {"name": "poly", "warmup_iterations": 1},
    "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "num_threads": 1, "seed": 3},
    "validation": {"patch_size": [40, 56, 40], "every": 1, "max_cases": 2},
}


def write_config(tmp_path: Path, **sections) -> Path:
    config = {**TINY, **sections}
    config["data"] = {**TINY["data"], "dataset_dir": str(shared_path("hippocampus")), **sections.get("data", {})}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, output: Path, *extra: str) -> int:
    return main(["train", str(config), "--output", str(output), "--no-progress", *extra])


# ------------------------------------------------------------------------------ config errors
def test_config_errors_name_the_bad_key(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        load_config(path, ["optimizer.lrr=0.1"])
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(path, ["training.epochs=0"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(path, ["loss.name=hinge"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["training.epochs"])
    with pytest.raises(ConfigError, match="unknown network 'nonet'"):
        Trainer(load_config(path, ["network.name=nonet"]), output_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown data card"):
        Trainer(load_config(path, ["data.data_card=nosuchcard"]), output_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="validation.patch_size"):
        Trainer(load_config(path, ["validation.patch_size=[40,54,40]"]), output_dir=tmp_path / "x")


def test_lr_schedule_poly_warmup_and_time_budget():
    schedule = LRSchedule(total_iterations=110, name="poly", power=0.9, warmup=10, min_ratio=0.0)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5**0.9)  # half of the 100 post-warm-up iterations
    schedule.time_fraction = 0.75  # the wall-clock budget is ahead of the iteration count
    assert schedule(60) == pytest.approx(0.25**0.9)
    cosine = LRSchedule(100, "cosine", 0.9, 0, min_ratio=0.1)
    assert cosine(50) == pytest.approx(0.1 + 0.9 * 0.5) and cosine(100) == pytest.approx(0.1)


def test_overrides_parse_yaml_values():
    raw = apply_overrides(
        {"training": {"epochs": 5}}, ["training.epochs=3", "network.config.filters=[8,16]", "loss.dsd={}"]
    )
    assert raw == {"training": {"epochs": 3}, "network": {"config": {"filters": [8, 16]}}, "loss": {"dsd": {}}}


def test_cli_reports_a_bad_key_in_one_line(tmp_path, capsys):
    assert train(write_config(tmp_path), tmp_path / "run", "training.epoch=3") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "training.epoch" in err


def test_bad_dataset_stops_before_training(tmp_path, capsys):
    source = shared_path("hippocampus")
    root = tmp_path / "ds"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in ("hippocampus_001", "hippocampus_004", "hippocampus_006"):
        os.symlink(source / "imagesTr" / f"{case}.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
        if case != "hippocampus_004":
            os.symlink(source / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    assert train(write_config(tmp_path, data={"dataset_dir": str(root)}), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hippocampus_004.nii.gz has no label" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------ end to end
def small_dataset(tmp_path: Path, cases: int = 8) -> Path:
    source = shared_path("hippocampus")
    root = tmp_path / "ds"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.nii.gz"))[:cases]:
            os.symlink(path, root / folder / path.name)
    (root / "dataset.json").write_text((source / "dataset.json").read_text())
    return root


def test_plan_train_resume_export(tmp_path):
    dataset, plan = small_dataset(tmp_path), tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                str(dataset),
                "--data-card",
                "hippocampus",
                "--output",
                str(plan),
                "--folds",
                "4",
                "--divisor",
                "4",
            ]
        )
        == 0
    )
    config = write_config(tmp_path, data={"dataset_dir": str(dataset), "plan": str(plan)})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(config, straight) == 0
    # stop after the first epoch (wall-clock guard), then continue with --resume
    assert train(config, resumed, "training.max_minutes=0.00001") == 0
    first = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)
    assert first["epoch"] == 1
    assert train(config, resumed, "--resume") == 0

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["network"]:
        torch.testing.assert_close(a["network"][key], b["network"][key], rtol=0, atol=0)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4

    rows = list(csv.DictReader((straight / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert 0 <= float(rows[-1]["val_dice_anterior_hippocampus"]) <= 1 and float(rows[-1]["samples_per_s"]) > 0
    assert any((straight / "tensorboard").iterdir())

    package = resolve_model(straight / "model")
    card = package.card
    assert card.network.name == "unet" and card.network.config["filters"] == [4, 8, 16]
    assert card.modality == ["MR"] and card.orientation == "RAS" and card.spacing == (1.0, 1.0, 1.0)
    assert [label.name for label in card.labels] == ["anterior hippocampus", "posterior hippocampus"]
    assert card.labels[0].type.value == "5366008"
    assert card.patch_size == (40, 56, 40) and card.normalization.scheme == "zscore"
    assert card.training["epochs"] == 2 and card.training["hardware"]["device"] == "cpu"
    assert set(card.metrics["validation"]["dice"]) == {"anterior hippocampus", "posterior hippocampus", "mean"}
    assert card.data_card["name"] == "hippocampus" and card.data_card["licence"]

    # resuming a finished run re-validates its final weights with the current settings and re-exports
    assert train(config, straight, "--resume", "validation.overlap=0.25") == 0
    rows = list(csv.DictReader((straight / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "2"] and rows[-1]["train_loss"] == ""
    assert resolve_model(straight / "model").card.overlap == 0.25

    # inference needs nothing but the package: a real case through the loaded network (the
    # re-export above wrote new weights, so the package is read again: its hash changed)
    network = resolve_model(straight / "model").load_network()
    image = read_image(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    x = torch.as_tensor(normalize_intensity(image.array.astype("float32"), card.normalization))
    x = torch.nn.functional.pad(x, [0, 40 - x.shape[2], 0, 56 - x.shape[1], 0, 40 - x.shape[0]])
    with torch.no_grad():
        assert network(x[None, None]).shape == (1, 3, 40, 56, 40)


def test_dsd_training_trains_the_side_heads(tmp_path):
    config = write_config(tmp_path, loss={"name": "dice_ce", "deep_supervision": False, "dsd": {}})
    assert train(config, tmp_path / "run", "training.epochs=1") == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    heads = [k for k in state["loss"] if k.startswith(("decoder_heads", "encoder_heads"))]
    trained = len(state["optimizer"]["param_groups"][0]["params"])
    network = resolve_model(tmp_path / "run" / "model").load_network()
    assert trained == len(list(network.parameters())) + len(state["loss"])  # the optimiser trains the heads too
    # a 3-stage U-Net: 2 decoder and 3 encoder side heads; the exported package holds only the network
    assert {k.split(".")[1] for k in heads if k.startswith("decoder")} == {"0", "1"}
    assert {k.split(".")[1] for k in heads if k.startswith("encoder")} == {"0", "1", "2"}
    weights = torch.load(tmp_path / "run" / "model" / "models" / "model.pt", weights_only=True)
    assert not any("heads" in k and k.startswith(("decoder", "encoder")) for k in weights)


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "medseg",
            "train",
            str(config),
            "--output",
            str(tmp_path / "ddp"),
            "--no-progress",
            "training.epochs=1",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package = resolve_model(tmp_path / "ddp" / "model")
    assert package.card.training["world_size"] == 2
    rows = list(csv.DictReader((tmp_path / "ddp" / "log.csv").open()))
    assert len(rows) == 1 and float(rows[0]["samples_per_s"]) > 0
