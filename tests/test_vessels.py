"""The vessel path (issue 13): TIFF stacks, the vesselNN manifest and folds, SPOCKMIP's whole-volume
MIP target through the transforms and deep supervision, a 1-channel sigmoid model, clDice and the
Betti-0 error. Real-data tests use ../shared/data/vessels and skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from medseg.errors import MissingGeometryError
from medseg.io import read_image
from medseg.io.tiff import parse_spacing, read_tiff, write_label_tiff
from tests.conftest import shared_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vessels"
MANIFEST = CONFIGS / "vesselnn_2photon.json"
#: 10 slices of 512 x 512: the thinnest stack, so tests stay fast
THIN = "burgess2014_noisySparseVessels"


def _stack(kind: str, case: str = THIN) -> Path:
    folder = shared_path("vessels", "vesselnn_2photon", kind)
    return next(folder.glob(f"{case}_*.tif"))


def _ras(array: np.ndarray) -> np.ndarray:
    """A TIFF's (X, Y, Z) array as Orientationd("RAS") sees it: the LPS in-plane axes flipped."""
    return array[::-1, ::-1, :]


# ------------------------------------------------------------------------------------------ TIFF
def test_tiff_axis_order_and_spacing_from_imagej(tmp_path):
    stack = np.zeros((5, 7, 9), np.uint16)  # (Z, Y, X) as stored
    stack[3, 2, 6] = 700
    path = tmp_path / "s.tif"
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(1 / 0.002, 1 / 0.003), metadata={"unit": "mm", "spacing": 0.01}
    )
    image = read_image(path)
    assert image.shape == (9, 7, 5)  # (X, Y, Z)
    assert image.array[6, 2, 3] == 700 and image.array.sum() == 700  # file (z=3, y=2, x=6) -> array[x, y, z]
    assert np.allclose(image.spacing, (0.002, 0.003, 0.01))
    assert np.allclose(np.diag(image.affine), (-0.002, -0.003, 0.01, 1))  # LPS identity, as ITK
    assert image.meta["spacing_source"] == "file"


def test_tiff_without_spacing_is_refused_unless_given():
    label = _stack("labels")
    with pytest.raises(MissingGeometryError, match="--spacing"):
        read_image(label)
    image = read_image(label, spacing=parse_spacing("0.99,0.99,5um"))
    assert np.allclose(image.spacing, (0.00099, 0.00099, 0.005))


def test_real_label_stack_orientation_and_binary_values():
    path = _stack("labels")
    stored = tifffile.imread(path)  # (Z, Y, X), 0/255
    assert set(np.unique(stored)) == {0, 255}
    z, y, x = (int(v[0]) for v in np.nonzero(stored))
    image = read_tiff(path, spacing=(1, 1, 1))
    assert image.array.shape == stored.shape[::-1]
    assert image.array[x, y, z] == 1
    assert set(np.unique(image.array)) == {0, 1} and image.array.dtype == np.uint8
    assert np.array_equal(image.array, (stored > 0).transpose(2, 1, 0))
    assert image.meta["binarized_from"] == 255
    santos = read_tiff(_stack("labels", "santos2015_lowContrastVessels"), spacing=(1, 1, 1))  # 0/254 uint16
    assert santos.meta["binarized_from"] == 254 and set(np.unique(santos.array)) == {0, 1}
    grey = read_tiff(_stack("denoised"), spacing=(1, 1, 1))
    assert "binarized_from" not in grey.meta and grey.array.max() > 1


def test_label_tiff_round_trip(tmp_path):
    label = read_tiff(_stack("labels"), spacing=(0.5, 0.5, 2.0))
    path = write_label_tiff(label, tmp_path / "pred.label.tif")
    again = read_tiff(path, label=False)
    assert np.array_equal(again.array, label.array)
    assert np.allclose(again.spacing, (0.5, 0.5, 2.0))


# ---------------------------------------------------------------------------------- dataset, configs
def test_manifest_folds_and_configs():
    from medseg.data.cases import read_case_manifest
    from medseg.training.config import load_config

    root = shared_path("vessels", "vesselnn_2photon")
    cases, folds = read_case_manifest(MANIFEST, root)
    assert len(cases) == 9 and all(c.spacing == (1.0, 1.0, 1.0) for c in cases)
    assert [len(f) for f in folds] == [3, 3, 3] and sorted(sum(folds, [])) == sorted(c.case_id for c in cases)
    for case in cases:  # paired by name prefix
        assert case.image.name.startswith(case.case_id) and case.label.name.startswith(case.case_id)
    configs = {n: load_config(CONFIGS / f"{n}.yaml") for n in ("unet_ftl", "unet_ftl_mip", "unet_ftl_mip_z")}
    shared = [
        {k: v for k, v in c.model_dump().items() if k not in ("name", "loss", "export")} for c in configs.values()
    ]
    assert shared[0] == shared[1] == shared[2]  # same data, network, patches, seed, budget
    assert (
        configs["unet_ftl_mip"].loss.kwargs["axis"] == "multi" and configs["unet_ftl_mip_z"].loss.kwargs["axis"] == "z"
    )
    assert configs["unet_ftl"].training.max_minutes == 12 and configs["unet_ftl"].network.config["out_channels"] == 1


# ---------------------------------------------------------------------------------- MIP target
def _patches(patch=(32, 32, 8), samples=1, axis="multi", seed=0, case=THIN):
    from medseg.data.transforms import training_transforms
    from medseg.package import Normalization

    transform = training_transforms(
        (1.0, 1.0, 1.0), Normalization(scheme="max"), patch, 1.0, None, mip_axis=axis, patch_max_normalization=True
    )
    transform.set_random_state(seed=seed)
    files = {"image": str(_stack("denoised", case)), "label": str(_stack("labels", case)), "spacing": [1.0, 1.0, 1.0]}
    return [transform(files)[0] for _ in range(samples)]


def test_mip_target_is_the_whole_volume_projection_cropped_to_the_patch():
    sparse = "poon2015_BBB_Leakage"  # 3 % vessel voxels, 25 slices: a thin patch misses vessels above/below
    label = _ras(read_tiff(_stack("labels", sparse), spacing=(1, 1, 1)).array)  # (H, W, D) = (512, 512, 25)
    (sample,) = _patches(case=sparse)
    h0, w0, d0 = (int(v) for v in sample["patch_start"])
    window = np.s_[h0 : h0 + 32, w0 : w0 + 32, d0 : d0 + 8]
    assert np.array_equal(sample["label"][0].numpy(), label[window])  # the recorded crop is the crop
    expected = {
        "z": label.max(axis=2)[h0 : h0 + 32, w0 : w0 + 32],
        "y": label.max(axis=1)[h0 : h0 + 32, d0 : d0 + 8],
        "x": label.max(axis=0)[w0 : w0 + 32, d0 : d0 + 8],
    }
    for axis, mip in expected.items():
        assert sample[f"label_mip_{axis}"].shape == (1, *mip.shape)
        assert np.array_equal(sample[f"label_mip_{axis}"][0].numpy(), mip), axis
    # the point of SPOCKMIP: vessels outside the patch's slab count
    assert (expected["z"] > label[window].max(axis=2)).any() and (expected["x"] > label[window].max(axis=0)).any()
    image = sample["image"][0]
    assert float(image.max()) == pytest.approx(1.0)  # per-patch max normalisation


def test_deep_supervision_passes_resized_mip_targets():
    from medseg.losses import DeepSupervisionLoss, MIPLoss
    from medseg.networks.base import NetworkOutput

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, logits, target, target_mip=None):
            seen.append((tuple(logits.shape[2:]), {a: tuple(m.shape[2:]) for a, m in target_mip.items()}))
            return MIPLoss(axis="multi", activation="sigmoid")(logits, target, target_mip)

    target = torch.zeros(2, 1, 16, 16, 8)
    target[:, :, 4:6, :, 2] = 1
    mips = {"x": target.amax(2), "y": target.amax(3), "z": target.amax(4)}
    output = NetworkOutput(logits=torch.randn(2, 1, 16, 16, 8), deep_supervision=[torch.randn(2, 1, 8, 8, 4)])
    loss = DeepSupervisionLoss(Probe(), [0.6, 0.4])(output, target, mips)
    assert torch.isfinite(loss)
    assert seen == [
        ((16, 16, 8), {"x": (16, 8), "y": (16, 8), "z": (16, 16)}),
        ((8, 8, 4), {"x": (8, 4), "y": (8, 4), "z": (8, 8)}),
    ]


def test_training_steps_on_a_real_stack_lower_the_loss():
    from medseg.losses import build_loss
    from medseg.networks import create_network

    torch.manual_seed(0)
    samples = _patches(samples=2)
    image = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    label = torch.stack([torch.as_tensor(s["label"]) for s in samples]).float()
    mips = {a: torch.stack([torch.as_tensor(s[f"label_mip_{a}"]) for s in samples]) for a in "xyz"}
    network = create_network(
        "unet", spatial_dims=3, in_channels=1, out_channels=1, filters=[4, 8, 16], strides=[1, 2, 2], deep_supervision=1
    )
    loss_fn = build_loss("ftl_mip", network, (32, 32, 8), {"axis": "multi"}, True, [1.0, 0.66])
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    network.train()
    losses = []
    for _ in range(12):
        loss = loss_fn(network(image, features=True), label, mips)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95, losses


def test_one_channel_sigmoid_output_is_thresholded_at_one_half():
    from medseg.inference.predictor import _probabilities_

    logits = np.array([[[[-2.0, -0.1, 0.0, 0.1, 3.0]]]], dtype=np.float32)  # (K=1, 1, 1, 5)
    labels = _probabilities_(logits.copy()).argmax(0)
    assert labels.flatten().tolist() == [0, 0, 0, 1, 1]  # p > 0.5 only


# ---------------------------------------------------------------------------------- topology metrics
def test_cldice_of_a_real_label_is_one_and_drops_when_a_vessel_is_cut():
    from medseg.metrics import connected_components, label_map_metrics, summarize, topology_metrics

    label = read_tiff(_stack("labels"), spacing=(1, 1, 1)).array[:256, :256]  # (256, 256, 10)
    same = topology_metrics(label, label)
    assert same["cldice"] == 1.0 and same["betti0_error"] == 0.0
    cut = label.copy()
    cut[120:126] = 0  # a 6-voxel slab across every vessel crossing x = 120
    assert label[120:126].any()
    broken = topology_metrics(cut, label)
    assert broken["cldice"] < 1.0
    assert connected_components(cut) >= connected_components(label)
    metrics = label_map_metrics(cut, label, 2, (1, 1, 1), topology=True)[1]
    assert metrics["cldice"] == pytest.approx(broken["cldice"]) and metrics["dice"] < 1.0
    assert "cldice" in summarize([{1: metrics}])["mean"]


def test_output_stem_keeps_a_long_stack_name_whole():
    """`medseg evaluate` pairs predictions and labels by name: the stem must not be cut short."""
    from medseg.outputs import stem_for

    name = "santos2015_mixedSizelowContrastVessels_BM4D_denoised"
    assert stem_for({"source": f"/data/denoised/{name}.tif"}, dicom=False) == name


# ------------------------------------------------------------------------ per-window max normalisation
class _RecordingNetwork(torch.nn.Module):
    """One-channel 'network' that records each input window's maximum and predicts background."""

    def __init__(self):
        super().__init__()
        self.peaks: list[float] = []

    def forward(self, x):
        self.peaks += x.flatten(1).amax(1).tolist()
        return torch.full((x.shape[0], 1, *x.shape[2:]), -5.0)


def test_each_inference_window_is_divided_by_its_max_as_training_patches_are():
    """SPOCKMIP normalises each training patch by its own max (``data.patch_max_normalization``,
    which the trainer writes into the card as ``normalization.window_max``); inference must do
    the same per sliding window."""
    from medseg.inference.predictor import Predictor
    from medseg.labels import Code, Label
    from medseg.package import ModelCard, NetworkSpec, Normalization
    from medseg.training.config import load_config

    config = load_config(CONFIGS / "unet_ftl_mip.yaml")
    assert config.data.patch_max_normalization
    image = read_tiff(_stack("denoised"), spacing=(1, 1, 1))
    image.array = np.ascontiguousarray(image.array[:128, :128])  # (128, 128, 10)
    peaks = {}
    for window_max in (False, True):
        card = ModelCard(
            name="vessels-test",
            network=NetworkSpec(name="unet", config={"out_channels": 1}),
            modality=["OT"],
            labels=[Label(id=1, name="vessel", type=Code(value="59820001", meaning="Blood vessel"))],
            spacing=(1.0, 1.0, 1.0),
            patch_size=(64, 64, 8),
            overlap=0.25,
            normalization=Normalization(scheme="max", window_max=window_max),
        )
        network = _RecordingNetwork()
        Predictor.from_network(network, card, sw_batch_size=1).predict(image)
        peaks[window_max] = np.array(network.peaks)
    assert len(peaks[True]) == len(peaks[False]) > 4
    np.testing.assert_allclose(peaks[True], 1.0, rtol=1e-6)  # every window has signal
    assert peaks[False].min() < 0.9  # the whole-stack max normalisation alone leaves dim windows dim


# ---------------------------------------------------------------------------------------- MIP preview
def test_mip_preview_shows_the_projections_of_a_real_stack_and_its_label(tmp_path):
    from PIL import Image as PILImage

    from medseg.labels import Code, Label
    from medseg.mip_preview import projections, write_mip_preview
    from medseg.preview import view_geometry

    image = read_tiff(_stack("denoised"), spacing=(1, 1, 1))
    label = read_tiff(_stack("labels"), spacing=(1, 1, 1)).array.astype(np.uint8)
    axis = next(v for v in view_geometry(image.affine) if v["name"] == "axial")["through"]
    assert axis == 2  # a TIFF stack's z (the stack axis) is the axial view's through-plane axis
    image_mip, label_mip = projections(image.array, label, axis)
    np.testing.assert_array_equal(image_mip[..., 0], image.array.max(axis=2))
    np.testing.assert_array_equal(label_mip[..., 0], label.max(axis=2))

    vessel = Label(id=1, name="vessel", color=(255, 0, 0), type=Code(value="59820001", meaning="Blood vessel"))
    path = write_mip_preview(label, image, [vessel], tmp_path / "stack.mip.png")
    png = PILImage.open(path)
    assert png.width == 1200 and png.text["Title"].startswith("medseg MIP preview")
    pixels = np.asarray(png.convert("RGB"))
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    right_half = red[:, pixels.shape[1] // 2 :]
    # a 512 x 512 stack is drawn in 5 x 5 in panels (500 px at 100 dpi): the red area of the label
    # panel is the projected label's share of it (the legend swatch adds a few pixels)
    panel = 500
    share = right_half.sum() / panel**2
    assert share == pytest.approx(label_mip.mean(), abs=0.02)
    assert not red[:-100, : pixels.shape[1] // 2].any()  # the image panel is grey only (legend below)


# ------------------------------------------------------------------------------- the bundled model
def test_bundled_vessels_model_segments_a_held_out_stack(tmp_path):
    """``medseg predict stack.tif --model vessels`` writes the card's outputs (label TIFF, NIfTI,
    report, MIP preview) for a crop of a stack the bundled model (fold 0) never saw in training."""
    from medseg.cli import main
    from medseg.metrics import topology_metrics
    from medseg.package import resolve_model

    package = resolve_model("vessels")
    assert package.card.formats == ["tiff", "nifti", "json", "mip"] and package.card.normalization.window_max
    held_out = "burgess2014_tgMouse"  # fold 0's validation stack
    assert held_out in __import__("json").loads(MANIFEST.read_text())["folds"][0]["val"]
    image = tifffile.imread(_stack("denoised", held_out))  # (Z, Y, X)
    label = tifffile.imread(_stack("labels", held_out))
    crop = (slice(None), slice(0, 192), slice(0, 192))
    tifffile.imwrite(tmp_path / "crop.tif", image[crop])
    tifffile.imwrite(tmp_path / "crop_label.tif", label[crop])
    out = tmp_path / "out"
    assert (
        main(["predict", str(tmp_path / "crop.tif"), "--model", "vessels", "--spacing", "1,1,1", "--output", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["crop.json", "crop.label.tif", "crop.mip.png", "crop.nii.gz"]
    predicted = read_tiff(out / "crop.label.tif", spacing=(1, 1, 1)).array
    reference = read_tiff(tmp_path / "crop_label.tif", spacing=(1, 1, 1)).array
    assert predicted.shape == reference.shape == (192, 192, image.shape[0])
    dice = (
        2 * np.logical_and(predicted, reference).sum() / (predicted.astype(bool).sum() + reference.astype(bool).sum())
    )
    assert dice > 0.75, dice
    assert topology_metrics(predicted, reference)["cldice"] > 0.6
