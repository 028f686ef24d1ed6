"""Nucleus instance metrics (PQ, DQ, SQ, AJI, Dice) and ``medseg evaluate`` on instance maps, on
real MoNuSeg instance labels (uint16 PNG, 1000 x 1000, 0 background)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, shared_path
from PIL import Image

from medseg.cli import main
from medseg.metrics import instance_metrics, summarize_instances

TILES = ("TCGA-2Z-A9J9-01A-01-TS1", "TCGA-69-7764-01A-01-TS1")


def _label(stem: str = TILES[0]) -> np.ndarray:
    return np.array(Image.open(shared_path("nuclei", "monuseg_test", "labels", f"{stem}.png"))).astype(np.int32)


def _crop(label: np.ndarray, top: int = 300, left: int = 300, size: int = 256) -> np.ndarray:
    """A crop with its ids made consecutive again (nuclei cut by the border stay, partially)."""
    crop = label[top : top + size, left : left + size]
    ids = np.union1d([0], crop)
    return np.searchsorted(ids, crop).astype(np.int32)


def _slow_aji(prediction: np.ndarray, label: np.ndarray) -> float:
    """Kumar et al. 2017, Algorithm 1, literally: one boolean mask per nucleus, loops over all pairs."""
    gt_ids = [i for i in np.unique(label) if i != 0]
    pred_ids = [j for j in np.unique(prediction) if j != 0]
    pred_masks = {j: prediction == j for j in pred_ids}
    used: set[int] = set()
    intersection = union = 0
    for i in gt_ids:
        g = label == i
        best, best_iou = None, 0.0
        for j in pred_ids:  # ascending ids, strict >: ties keep the lowest id
            inter = np.logical_and(g, pred_masks[j]).sum()
            iou = inter / np.logical_or(g, pred_masks[j]).sum()
            if iou > best_iou:
                best, best_iou = j, iou
        if best is None:
            union += g.sum()
        else:
            intersection += np.logical_and(g, pred_masks[best]).sum()
            union += np.logical_or(g, pred_masks[best]).sum()
            used.add(best)
    union += sum(pred_masks[j].sum() for j in pred_ids if j not in used)
    return intersection / union


def _erode_instances(label: np.ndarray) -> np.ndarray:
    """Each nucleus eroded by one pixel: a pixel keeps its id when its 4 neighbours share it."""
    padded = np.pad(label, 1)
    centre = padded[1:-1, 1:-1]
    keep = (
        (padded[:-2, 1:-1] == centre)
        & (padded[2:, 1:-1] == centre)
        & (padded[1:-1, :-2] == centre)
        & (padded[1:-1, 2:] == centre)
    )
    return np.where(keep, label, 0)


def test_real_label_against_itself_is_perfect():
    label = _label()
    n = len(np.unique(label)) - 1
    metrics = instance_metrics(label, label)
    assert metrics == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "aji": 1.0, "dice": 1.0, "num_predicted": n, "num_reference": n}


def test_permuted_non_consecutive_ids_are_still_perfect():
    label = _label(TILES[1])
    ids = np.unique(label)[1:]
    rng = np.random.default_rng(0)
    new_ids = rng.permutation(ids.size) * 3_000_017 + 17  # shuffled, sparse, up to ~2.5e9 (uint32)
    lut = np.zeros(label.max() + 1, dtype=np.int64)
    lut[ids] = new_ids
    permuted = lut[label]
    assert not np.array_equal(np.unique(permuted)[1:], ids)
    metrics = instance_metrics(permuted.astype(np.uint32), label.astype(np.uint16))
    assert [metrics[k] for k in ("pq", "dq", "sq", "aji", "dice")] == [1.0] * 5
    assert metrics["num_predicted"] == metrics["num_reference"] == ids.size


def test_dropping_a_tenth_of_the_nuclei():
    label = _label()
    ids = np.unique(label)[1:]
    n = ids.size
    dropped = np.random.default_rng(1).choice(ids, size=n // 10, replace=False)
    prediction = np.where(np.isin(label, dropped), 0, label)
    k = n - dropped.size
    metrics = instance_metrics(prediction, label)
    kept_area, total_area = int((prediction > 0).sum()), int((label > 0).sum())
    assert metrics["num_predicted"] == k and metrics["num_reference"] == n
    assert metrics["dq"] == pytest.approx(2 * k / (k + n), rel=1e-12)  # TP = k, FP = 0, FN = n - k
    assert metrics["sq"] == pytest.approx(1.0, rel=1e-12)
    assert metrics["pq"] == pytest.approx(2 * k / (k + n), rel=1e-12)
    assert metrics["aji"] == pytest.approx(kept_area / total_area, rel=1e-12)  # dropped nuclei: union only
    assert metrics["dice"] == pytest.approx(2 * kept_area / (kept_area + total_area), rel=1e-12)


def test_eroding_the_nuclei_lowers_pq_as_computed_by_hand():
    label = _label()
    prediction = _erode_instances(label)
    n = len(np.unique(label)) - 1
    area = np.bincount(label.ravel(), minlength=label.max() + 1)[1:]
    eroded = np.bincount(prediction.ravel(), minlength=label.max() + 1)[1:]
    present = area > 0
    area, eroded = area[present], eroded[present]
    iou = eroded / area  # each eroded nucleus lies inside its own nucleus and overlaps no other
    tp = int((iou > 0.5).sum())
    fp = int(((eroded > 0) & (iou <= 0.5)).sum())
    fn = n - tp
    dq = tp / (tp + fp / 2 + fn / 2)
    sq = iou[iou > 0.5].mean()
    metrics = instance_metrics(prediction, label)
    assert metrics["num_predicted"] == tp + fp and metrics["num_reference"] == n
    assert metrics["dq"] == pytest.approx(dq, rel=1e-12)
    assert metrics["sq"] == pytest.approx(sq, rel=1e-12)
    assert metrics["pq"] == pytest.approx(dq * sq, rel=1e-12)
    assert metrics["pq"] < 0.9
    assert metrics["aji"] == pytest.approx(eroded.sum() / area.sum(), rel=1e-12)
    assert metrics["dice"] == pytest.approx(2 * eroded.sum() / (eroded.sum() + area.sum()), rel=1e-12)


@pytest.fixture
def perturbed_crop():
    """A real 256 x 256 crop and a prediction: shifted by (3, -2) px, two nuclei merged into one (a
    prediction taken by several references), one nucleus dropped and a false-positive blob added."""
    label = _crop(_label())
    prediction = np.zeros_like(label)
    prediction[3:, :-2] = label[:-3, 2:]
    ids = np.unique(prediction)[1:]
    prediction[prediction == ids[5]] = ids[6]
    prediction[prediction == ids[10]] = 0
    prediction[prediction == ids[20]] = 0
    blob = np.zeros_like(label, dtype=bool)
    blob[240:250, 5:15] = True
    prediction[blob & (prediction == 0)] = 9999
    return prediction, label


def test_aji_equals_the_slow_reference_on_a_real_crop(perturbed_crop):
    prediction, label = perturbed_crop
    metrics = instance_metrics(prediction, label)
    assert 0.3 < metrics["aji"] < 0.95
    assert metrics["aji"] == pytest.approx(_slow_aji(prediction, label), rel=1e-12)


def test_pq_equals_monai_on_a_real_crop(perturbed_crop):
    import torch
    from monai.metrics import compute_panoptic_quality

    prediction, label = perturbed_crop
    p, y = torch.from_numpy(prediction.astype(np.int32)), torch.from_numpy(label.astype(np.int32))
    for threshold in (0.5, 0.3):
        metrics = instance_metrics(prediction, label, iou_threshold=threshold)
        for key, name in (("pq", "pq"), ("dq", "rq"), ("sq", "sq")):
            reference = compute_panoptic_quality(p, y, metric_name=name, remap=True, match_iou_threshold=threshold)
            assert metrics[key] == pytest.approx(float(reference), abs=1e-5), (threshold, key)
    assert 0.2 < instance_metrics(prediction, label)["pq"] < 0.9


def test_edge_cases_and_bad_inputs():
    label = _crop(_label())
    empty = np.zeros_like(label)
    scores = ("pq", "dq", "sq", "aji", "dice")
    both = instance_metrics(empty, empty)
    assert [both[k] for k in scores] == [1.0] * 5 and both["num_predicted"] == both["num_reference"] == 0
    for prediction, reference in ((empty, label), (label, empty)):
        one = instance_metrics(prediction, reference)
        assert [one[k] for k in scores] == [0.0] * 5
    with pytest.raises(ValueError, match="2D"):
        instance_metrics(label[None], label[None])
    with pytest.raises(ValueError, match="differs"):
        instance_metrics(label[:-1], label)
    with pytest.raises(ValueError, match="integer"):
        instance_metrics(label.astype(np.float32), label)
    with pytest.raises(ValueError, match="negative"):
        instance_metrics(label - 1, label)
    with pytest.raises(ValueError, match="iou_threshold"):
        instance_metrics(label, label, iou_threshold=0.0)


def test_summary_is_the_mean_over_images():
    label = _crop(_label())
    per_image = [instance_metrics(label, label), instance_metrics(_erode_instances(label), label)]
    summary = summarize_instances(per_image)
    assert list(summary)[:5] == ["pq", "dq", "sq", "aji", "dice"]
    for key in per_image[0]:
        assert summary[key] == pytest.approx((per_image[0][key] + per_image[1][key]) / 2)
    assert summarize_instances([]) == {}


def test_a_full_tile_takes_well_under_a_second():
    label = _label()
    prediction = np.zeros_like(label)
    prediction[4:, 3:] = label[:-4, :-3]
    for pair in ((label, label), (prediction, label)):
        elapsed = []
        for _ in range(3):
            start = time.perf_counter()
            instance_metrics(*pair)
            elapsed.append(time.perf_counter() - start)
        assert min(elapsed) < 0.5, elapsed


@pytest.fixture
def instance_folders(tmp_path):
    """Two real label tiles as predictions ``<stem>.instances.tif`` (uint16 and uint32) next to
    their PNG labels."""
    import tifffile

    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir(), label_dir.mkdir()
    for stem, dtype in zip(TILES, (np.uint16, np.uint32)):
        source = shared_path("nuclei", "monuseg_test", "labels", f"{stem}.png")
        shutil.copy(source, label_dir / source.name)
        tifffile.imwrite(pred_dir / f"{stem}.instances.tif", _label(stem).astype(dtype))
    return pred_dir, label_dir


def _medseg(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medseg", *argv], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def test_evaluate_instance_table_end_to_end(instance_folders):
    pred_dir, label_dir = instance_folders
    result = _medseg("evaluate", str(pred_dir), str(label_dir))  # instance mode picked from *.instances.tif
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2 images"
    assert lines[1].split() == ["image", "PQ", "DQ", "SQ", "AJI", "Dice", "#pred", "#ref"]
    assert [line.split()[0] for line in lines[2:]] == [*TILES, "mean"]
    mean = lines[-1].split()
    assert [float(v) for v in mean[1:6]] == [1.0] * 5


def test_evaluate_instances_json_end_to_end(instance_folders):
    pred_dir, label_dir = instance_folders
    result = _medseg("evaluate", str(pred_dir), str(label_dir), "--instances", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["cases"]) == sorted(TILES)
    assert report["summary"]["pq"] == pytest.approx(1.0)
    for stem in TILES:
        n = len(np.unique(_label(stem))) - 1
        assert report["cases"][stem]["num_reference"] == report["cases"][stem]["num_predicted"] == n


def test_evaluate_instances_mismatched_grid_fails_with_one_line(instance_folders):
    import tifffile

    pred_dir, label_dir = instance_folders
    tifffile.imwrite(pred_dir / f"{TILES[1]}.instances.tif", _label(TILES[1])[:500].astype(np.uint16))
    result = _medseg("evaluate", str(pred_dir), str(label_dir))
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert TILES[1] in line and "500x1000" in line and "1000x1000" in line


def test_evaluate_instances_without_pairs(instance_folders, tmp_path, capsys):
    _, label_dir = instance_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty), str(label_dir), "--instances"]) == 2
    assert "no instance map" in capsys.readouterr().err
