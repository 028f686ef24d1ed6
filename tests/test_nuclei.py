"""The nuclei path (issue 12) on real MoNuSeg tiles: HoVer targets and the watershed recover real
instances, the HoVer loss, a tiny `medseg train` run (task: nuclei) whose loss falls, and `medseg
predict` on a real tile writing all four outputs. Real-data tests skip when ../shared/data is absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from medseg.cli import main
from medseg.io.tile import read_instance_map
from medseg.metrics import instance_metrics
from medseg.nuclei.postprocess import instances_from_hover, sobel_kernel_size
from medseg.nuclei.targets import hover_targets
from tests.conftest import shared_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "nuclei"
TEST_TILE = "TCGA-2Z-A9J9-01A-01-TS1"
#: a 20x (0.5 um/px) training tile
HALF_MAGNIFICATION_TILE = "TCGA-HE-7128-01Z-00-DX1"


def _label(split: str, name: str) -> np.ndarray:
    return read_instance_map(shared_path("nuclei", split, "labels", f"{name}.png"))


def _watershed_from_targets(label: np.ndarray, mpp: float) -> np.ndarray:
    targets = hover_targets(label)
    logits = torch.stack([1 - targets[0], targets[0]]) * 10
    return instances_from_hover(logits, targets[1:], mpp)


@pytest.mark.parametrize(
    ("split", "name", "mpp"), [("monuseg_test", TEST_TILE, 0.25), ("monuseg_train", HALF_MAGNIFICATION_TILE, 0.5)]
)
def test_instances_to_hover_maps_to_watershed_recovers_real_nuclei(split, name, mpp):
    label = _label(split, name)
    recovered = _watershed_from_targets(label, mpp)
    metrics = instance_metrics(recovered, label)
    assert metrics["pq"] >= 0.95, metrics
    # at 20x some labelled nuclei are under the 10-pixel minimum object size and are dropped
    assert abs(metrics["num_predicted"] - metrics["num_reference"]) <= 0.04 * metrics["num_reference"]


def test_hover_targets_of_a_real_label():
    label = _label("monuseg_test", TEST_TILE)
    targets = hover_targets(label)
    assert targets.shape == (3, *label.shape)
    assert torch.equal(targets[0] > 0, torch.from_numpy(label > 0))
    assert float(targets[1:].abs().max()) == pytest.approx(1.0)
    assert float(targets[1:][:, torch.from_numpy(label == 0)].abs().max()) == 0.0
    # inside one nucleus the horizontal map grows from left (-1) to right (+1)
    ids, counts = np.unique(label[label > 0], return_counts=True)
    rows, cols = np.nonzero(label == ids[np.argmax(counts)])
    row = rows[len(rows) // 2]
    line = targets[1, row, cols[rows == row]]
    assert line[0] < 0 < line[-1] and bool((line.diff() >= 0).all())


def test_sobel_kernel_follows_cellvit_at_40x_and_20x():
    assert sobel_kernel_size(0.25) == 21
    assert sobel_kernel_size(0.5) == 11


def test_hover_loss_is_zero_for_the_targets_and_matches_monai_msge():
    from monai.apps.pathology.losses import HoVerNetLoss

    from medseg.losses import HoVerLoss

    label = torch.from_numpy(_label("monuseg_test", TEST_TILE)[:128, :128].astype(np.int64))
    target = hover_targets(label)[None]
    loss = HoVerLoss()
    perfect = torch.cat([torch.stack([1 - target[:, 0], target[:, 0]], 1) * 20, target[:, 1:]], 1)
    terms = loss.terms(perfect, target)
    assert float(terms["mse"]) == 0.0 and float(terms["msge"]) == 0.0
    assert float(terms["dice"]) < 1e-3 and float(terms["ftl"]) < 1e-2
    noisy = perfect.clone()
    noisy[:, 2:] += 0.1 * torch.randn_like(noisy[:, 2:])
    monai_msge = HoVerNetLoss()._mse_gradient_loss(noisy[:, 2:], target[:, 1:], target[:, 0])
    assert float(loss.terms(noisy, target)["msge"]) == pytest.approx(float(monai_msge), rel=1e-5)


# ------------------------------------------------------------------------- train, export, predict
@pytest.fixture(scope="module")
def tiny_nuclei_run(tmp_path_factory):
    """`medseg train` of a tiny U-Net on 5 real training tiles (4 train, 1 validation tile)."""
    dataset = shared_path("nuclei", "monuseg_train")
    from medseg.training import load_config, trainer_for

    out = tmp_path_factory.mktemp("nuclei-run")
    config = load_config(
        CONFIGS / "unet_hover.yaml",
        [
            f"data.dataset_dir={dataset}",  # $MEDSEG_SHARED_DATA, wherever the checkout is
            "data.max_cases=5",
            "data.patch_size=[128,128]",
            "network.config.filters=[8,16,32]",
            "network.config.strides=[1,2,2]",
            "augmentation.enabled=false",
            "optimizer.lr=0.003",
            "scheduler.time_based=false",
            "scheduler.warmup_iterations=0",
            "training.max_minutes=null",
            "training.epochs=3",
            "training.iterations_per_epoch=6",
            "training.batch_size=2",
            "training.num_threads=1",
            "training.amp_cpu=false",
            "validation.every=3",
        ],
    )
    trainer = trainer_for(config)(config, output_dir=out, show_progress=False)
    return trainer.fit()


def test_tiny_training_on_real_tiles_lowers_the_loss_and_exports_a_nuclei_package(tiny_nuclei_run):
    result = tiny_nuclei_run
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    card = json.loads((result.package / "configs" / "metadata.json").read_text())["medseg"]
    assert card["task"] == "nuclei" and card["spacing"] == [0.00025, 0.00025]
    assert card["metrics"]["validation"]["num_tiles"] == 1
    assert {"pq", "aji", "dice"} <= set(card["metrics"]["validation"])
    log = (result.output_dir / "log.csv").read_text().splitlines()
    assert "val_pq" in log[0] and len(log) == 4


def test_predict_on_a_real_tile_writes_the_four_outputs(tiny_nuclei_run, tmp_path):
    image = Image.open(shared_path("nuclei", "monuseg_test", "images", f"{TEST_TILE}.png")).convert("RGB")
    crop = tmp_path / "inputs" / "crop.png"
    crop.parent.mkdir()
    image.crop((0, 0, 300, 260)).save(crop)  # not a multiple of the window: padded, then cropped back
    before = crop.read_bytes()
    out = tmp_path / "out"
    assert main(["predict", str(crop), "--model", str(tiny_nuclei_run.package), "--output", str(out)]) == 0
    assert crop.read_bytes() == before
    names = sorted(p.name for p in out.iterdir())
    assert names == ["crop.geojson", "crop.instances.tif", "crop.json", "crop.overlay.png"]
    instances = tifffile.imread(out / "crop.instances.tif")
    assert instances.shape == (260, 300) and instances.dtype in (np.uint16, np.uint32)
    report = json.loads((out / "crop.json").read_text())
    assert report["nuclei"]["count"] == len(np.unique(instances[instances > 0]))
    assert report["model"]["mpp_source"] == "assumed"
    features = json.loads((out / "crop.geojson").read_text())["features"]
    assert len(features) <= report["nuclei"]["count"]
    assert Image.open(out / "crop.overlay.png").size == (300, 260)


def test_predict_resamples_a_20x_tiff_to_the_model_and_back(tiny_nuclei_run, tmp_path):
    array = np.asarray(Image.open(shared_path("nuclei", "monuseg_test", "images", f"{TEST_TILE}.png")).convert("RGB"))
    tile = tmp_path / "half.tif"
    half = np.asarray(Image.fromarray(array[:400, :400]).resize((200, 200), Image.BILINEAR))
    tifffile.imwrite(tile, half, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    assert main(["predict", str(tile), "--model", str(tiny_nuclei_run.package), "--output", str(out)]) == 0
    assert tifffile.imread(out / "half.instances.tif").shape == (200, 200)
    report = json.loads((out / "half.json").read_text())
    assert report["model"]["mpp_source"] == "file" and report["image"]["mpp"] == pytest.approx(0.5)


def test_predict_refuses_bad_nuclei_input_with_one_line(tiny_nuclei_run, tmp_path, capsys):
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(b"not a tile")
    out = tmp_path / "out"
    assert main(["predict", str(volume), "--model", str(tiny_nuclei_run.package), "--output", str(out)]) == 1
    assert "not a PNG, JPEG or TIFF tile" in capsys.readouterr().out
    assert not out.exists()
    crop = tmp_path / "crop.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(crop)
    args = ["predict", str(crop), "--model", str(tiny_nuclei_run.package), "--output", str(out)]
    assert main([*args, "--mpp", "-1"]) == 2
    assert main([*args, "--formats", "nifti"]) == 2
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 64, 64), np.uint8), photometric="minisblack")  # a z-stack
    assert main(["predict", str(stack), "--model", str(tiny_nuclei_run.package), "--output", str(out)]) == 1
    assert "2D tile" in capsys.readouterr().out


def test_nuclei_configs_validate():
    from medseg.training import load_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        assert config.task == "nuclei" and config.loss.name == "hover", path.name
        assert yaml.safe_load(path.read_text())["training"]["max_minutes"] <= 60


def test_mirroring_tta_makes_the_prediction_mirror_equivariant(tiny_nuclei_run):
    from medseg.io.tile import Tile
    from medseg.nuclei.predictor import NucleiPredictor

    array = np.asarray(Image.open(shared_path("nuclei", "monuseg_test", "images", f"{TEST_TILE}.png")).convert("RGB"))
    tile = Tile(np.ascontiguousarray(array[300:556, 300:556]), 0.25, "crop.png")
    mirrored = Tile(np.ascontiguousarray(tile.array[:, ::-1]), 0.25, "mirrored.png")
    predictor = NucleiPredictor(tiny_nuclei_run.package, tta=True)
    assert predictor.tta
    from medseg.nuclei.transforms import rgb_normalize

    x = rgb_normalize(torch.from_numpy(tile.array.transpose(2, 0, 1).copy()))[None]
    maps, maps_of_mirrored = predictor.hover_maps(x), predictor.hover_maps(x.flip(3)).flip(3)
    maps_of_mirrored[:, 2] = -maps_of_mirrored[:, 2]  # the horizontal map changes sign
    assert torch.allclose(maps, maps_of_mirrored, atol=1e-4)
    instances = predictor.predict(tile).instances
    again = predictor.predict(mirrored).instances[:, ::-1]
    assert instance_metrics(again, instances)["pq"] >= 0.98


def test_bundled_nuclei_model_segments_a_real_test_tile(tmp_path):
    """The bundled `nuclei` model on a crop of a MoNuSeg test tile (never trained or tuned on):
    all four outputs, and the nuclei match the reference labels (PQ well above chance)."""
    from medseg.package import resolve_model

    package = resolve_model("nuclei")
    assert package.card.task == "nuclei" and (package.path / "models" / "model.pt").stat().st_size < 30 * 2**20
    image = Image.open(shared_path("nuclei", "monuseg_test", "images", f"{TEST_TILE}.png")).convert("RGB")
    label = _label("monuseg_test", TEST_TILE)[250:762, 250:762]
    crop = tmp_path / "crop.png"
    image.crop((250, 250, 762, 762)).save(crop)
    out = tmp_path / "out"
    assert main(["predict", str(crop), "--model", "nuclei", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "crop.geojson",
        "crop.instances.tif",
        "crop.json",
        "crop.overlay.png",
    ]
    instances = tifffile.imread(out / "crop.instances.tif").astype(np.int32)
    metrics = instance_metrics(instances, label)
    assert metrics["pq"] >= 0.45 and metrics["dice"] >= 0.7, metrics
    report = json.loads((out / "crop.json").read_text())
    assert report["nuclei"]["count"] == metrics["num_predicted"]
