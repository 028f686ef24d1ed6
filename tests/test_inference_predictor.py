"""The Predictor end to end on real images: geometry, agreement with the MONAI-only reference,
DICOM in -> NIfTI + DICOM SEG out on the source grid, post-processing and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import InputShapeError, ModalityMismatchError
from medseg.inference import Prediction, Predictor
from medseg.inference.matching import field_of_view, image_mismatch
from medseg.inference.postprocess import clean_label_map
from medseg.inference.reference import monai_reference
from medseg.inference.statistics import label_statistics
from medseg.io import read_image, read_seg
from medseg.io.image import Image
from medseg.labels import Code, Label
from medseg.networks import create_network
from medseg.outputs import series_stem, write_outputs
from medseg.package import ModelCard, ModelPackage, NetworkSpec, PostProcessing
from tests.conftest import shared_path

LABELS = [
    Label(id=1, name="anterior hippocampus", color=(255, 80, 0), type=Code(value="5300007", meaning="Hippocampus")),
    Label(id=2, name="posterior hippocampus", color=(0, 120, 255), type=Code(value="5300007", meaning="Hippocampus")),
]
# MSD Task04 training crops span 31-43 x 40-59 x 24-47 mm (1 mm voxels, RAS)
HIPPOCAMPUS_FOV = {"min": [31, 40, 24], "max": [43, 59, 47]}


def make_package(path: Path, spacing=(1.0, 1.0, 1.0), seed: int = 0, **card_fields) -> ModelPackage:
    """A small untrained 3D U-Net package with the hippocampus label card."""
    torch.manual_seed(seed)
    # deep_supervision=1: the unet builder fails with 0 heads on MONAI 1.6.1 (reported)
    config = dict(spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16), deep_supervision=1)
    network = create_network("unet", **config)
    fields = dict(
        name="hippocampus-test",
        version="0.0.1",
        network=NetworkSpec(name="unet", config=config),
        modality=["MR"],
        labels=LABELS,
        spacing=spacing,
        patch_size=(24, 32, 24),
        overlap=0.5,
        training={"field_of_view_mm": HIPPOCAMPUS_FOV},
    )
    fields.update(card_fields)
    return ModelPackage.save(path, ModelCard(**fields), network.state_dict())


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> ModelPackage:
    return make_package(tmp_path_factory.mktemp("models") / "hippocampus-test")


@pytest.fixture(scope="module")
def resampling_package(tmp_path_factory) -> ModelPackage:
    return make_package(tmp_path_factory.mktemp("models") / "resampling", spacing=(1.3, 0.9, 1.1), seed=1)


@pytest.fixture(scope="module")
def hippocampus() -> Image:
    return read_image(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))


def _lps(image: Image) -> Image:
    """The same voxels stored with the first two axes reversed (an LPS-ordered file)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.shape[0] - 1, image.shape[1] - 1]
    return Image(image.array[::-1, ::-1].copy(), image.affine @ flip, dict(image.meta))


@pytest.mark.parametrize("runtime", ["eager", "channels_last", "openvino"])
@pytest.mark.parametrize("which", ["same_spacing", "resampled"])
@pytest.mark.parametrize("lps", [False, True])
def test_matches_monai_reference_on_input_grid(runtime, which, lps, package, resampling_package, hippocampus):
    pkg = package if which == "same_spacing" else resampling_package
    image = _lps(hippocampus) if lps else hippocampus
    prediction = Predictor(pkg, runtime=runtime).predict(image, return_probabilities=True)
    assert isinstance(prediction, Prediction)
    assert prediction.label_map.shape == image.shape
    assert np.array_equal(prediction.label_map.affine, image.affine)  # bit for bit
    labels, probabilities = monai_reference(pkg.load_network(), pkg.card, image)
    assert prediction.probabilities.shape == probabilities.shape
    assert np.abs(prediction.probabilities - probabilities).max() <= 1e-3
    assert (prediction.label_map.array == labels).mean() >= 0.999
    assert prediction.settings["model_grid"]["resampled"] == (which == "resampled")


def test_input_image_is_left_untouched(package):
    image = read_image(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    image.array = np.ascontiguousarray(image.array, dtype=np.float32)  # the no-copy case
    before = image.array.copy()
    Predictor(package, runtime="eager").predict(image)
    assert np.array_equal(image.array, before)


def test_orientation_does_not_change_the_segmentation(package, hippocampus):
    predictor = Predictor(package, runtime="eager")
    ras = predictor.predict(hippocampus).label_map.array
    lps = predictor.predict(_lps(hippocampus)).label_map.array
    assert np.array_equal(lps, ras[::-1, ::-1])


def test_tta_folds_and_float16_accumulator(package, resampling_package, tmp_path, hippocampus):
    fold = make_package(tmp_path / "fold1", seed=5)
    plain = Predictor(package, runtime="eager").predict(hippocampus, return_probabilities=True)
    ensemble = Predictor(package, tta=True, mirror_axes=(0, 1), folds=[fold], runtime="eager")
    result = ensemble.predict(hippocampus, return_probabilities=True)
    assert result.settings["passes"] == 2 * 4
    assert not np.allclose(result.probabilities, plain.probabilities)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    half = Predictor(package, runtime="eager", accumulator_dtype=torch.float16).predict(hippocampus)
    assert (half.label_map.array == plain.label_map.array).mean() >= 0.999
    with pytest.raises(ValueError, match="does not match"):
        Predictor(package, folds=[resampling_package])


def test_dicom_series_to_nifti_seg_json_png_on_source_grid(package, tmp_path):
    image = read_image(shared_path("dicom", "hippocampus_crop_study1"))
    assert image.dicom_source
    prediction = Predictor(package).predict(image)
    label_map = prediction.label_map
    assert label_map.shape == image.shape and np.array_equal(label_map.affine, image.affine)
    assert set(np.unique(label_map.array)) <= {0, 1, 2}

    paths = write_outputs(prediction, image, package.card, tmp_path)
    assert sorted(paths) == ["json", "nifti", "png", "seg"]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # nothing half-written

    nifti = nib.load(str(paths["nifti"]))
    assert nifti.shape == image.shape
    np.testing.assert_allclose(nifti.affine, image.affine, atol=1e-5)
    assert np.array_equal(np.asarray(nifti.dataobj), label_map.array)

    seg = read_seg(paths["seg"], source=image)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert np.array_equal(seg.array, label_map.array)

    report = json.loads(paths["json"].read_text())
    assert report["model"]["name"] == "hippocampus-test"
    assert report["input"]["shape"] == list(image.shape)
    assert report["input"]["series_uid"] == image.meta["series_uid"]
    assert [entry["id"] for entry in report["labels"]] == [1, 2]
    assert report["labels"][0]["voxels"] == int((label_map.array == 1).sum())
    assert "PatientName" not in paths["json"].read_text()
    assert report["outputs"] == {k: p.name for k, p in paths.items()}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert series_stem(image) in paths["nifti"].name


def test_nifti_input_writes_no_seg(package, hippocampus, tmp_path):
    prediction = Predictor(package).predict(hippocampus)
    paths = write_outputs(prediction, hippocampus, package.card, tmp_path, formats=("nifti", "seg", "json"))
    assert sorted(paths) == ["json", "nifti"]
    assert paths["nifti"].name == "hippocampus_001.nii.gz"


def test_modality_and_channel_errors(package, hippocampus):
    predictor = Predictor(package)
    ct = Image(hippocampus.array, hippocampus.affine, {"modality": "CT", "series_uid": "1.2.3"})
    with pytest.raises(ModalityMismatchError, match="CT"):
        predictor.predict(ct)
    two_channels = Image(np.stack([hippocampus.array] * 2, -1), hippocampus.affine, {})
    with pytest.raises(InputShapeError, match="channel"):
        predictor.predict(two_channels)


def test_field_of_view_rule(package, hippocampus):
    assert image_mismatch(hippocampus, package.card) is None
    brain = Image(np.zeros((320, 280, 22), np.int16), np.diag([0.6875, 0.6875, 6.5, 1.0]), {"modality": "MR"})
    np.testing.assert_allclose(field_of_view(brain), [220, 192.5, 143])
    assert "field of view" in image_mismatch(brain, package.card)


def test_postprocessing_largest_component_and_small_blobs():
    label_map = np.zeros((20, 20, 20), np.uint8)
    label_map[2:6, 2:6, 2:6] = 1  # 64 voxels
    label_map[10:12, 10:12, 10:12] = 1  # 8 voxels, a second component
    label_map[15:19, 15:19, 1:3] = 2  # 32 voxels
    label_map[0, 19, 19] = 2  # a single voxel
    largest = clean_label_map(label_map.copy(), (1, 1, 1), PostProcessing(largest_component=True))
    assert np.bincount(largest.ravel()).tolist() == [8000 - 96, 64, 32]
    # spacing 1 x 1 x 2 mm: the 8-voxel blob is 16 mm^3, the single voxel 2 mm^3
    kept = clean_label_map(label_map.copy(), (1, 1, 2), PostProcessing(min_blob_mm3=16))
    assert np.bincount(kept.ravel()).tolist() == [8000 - 104, 72, 32]
    removed = clean_label_map(label_map.copy(), (1, 1, 2), PostProcessing(min_blob_mm3=17))
    assert np.bincount(removed.ravel()).tolist() == [8000 - 96, 64, 32]


def test_statistics_on_real_labels():
    label_path = shared_path("hippocampus", "labelsTr", "hippocampus_001.nii.gz")
    image_path = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    labels = np.asarray(nib.load(str(label_path)).dataobj).astype(np.uint8)
    image = nib.load(str(image_path))
    intensities = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine @ np.diag([2.0, 1.0, 1.0, 1.0])  # pretend 2 mm along i: 2 mm^3 voxels
    stats = label_statistics(labels, affine, LABELS, intensities)
    for entry in stats:
        mask = labels == entry["id"]
        assert entry["voxels"] == int(mask.sum()) > 0
        assert entry["volume_ml"] == pytest.approx(mask.sum() * 2 / 1000)
        assert entry["mean_intensity"] == pytest.approx(float(intensities[mask].mean()), rel=1e-5)
    empty = label_statistics(np.zeros_like(labels), affine, LABELS, intensities)
    assert [entry["volume_ml"] for entry in empty] == [0, 0]
    assert empty[0]["mean_intensity"] is None


def test_2d_model_runs_slice_by_slice(tmp_path, hippocampus):
    torch.manual_seed(0)
    config = dict(spatial_dims=2, in_channels=1, out_channels=3, filters=(4, 8, 16), deep_supervision=1)
    card = ModelCard(
        name="hippocampus-2d",
        network=NetworkSpec(name="unet", config=config),
        modality=["MR"],
        labels=LABELS,
        spacing=(1.0, 1.0, 1.0),
        patch_size=(32, 32),
        overlap=0.25,
    )
    package = ModelPackage.save(tmp_path / "2d", card, create_network("unet", **config).state_dict())
    prediction = Predictor(package, runtime="eager").predict(hippocampus)
    assert prediction.label_map.shape == hippocampus.shape
    # slice k of the label map is the 2D network's argmax on slice k alone
    network = package.load_network()
    k = hippocampus.shape[2] // 2
    from monai.inferers import sliding_window_inference as monai_sliding_window_inference

    from medseg.preprocess import normalize_intensity

    volume = normalize_intensity(np.asarray(hippocampus.array, dtype=np.float32), card.normalization)
    with torch.no_grad():
        logits = monai_sliding_window_inference(
            torch.from_numpy(volume[None, None, :, :, k]), (32, 32), 1, network, 0.25, "gaussian"
        )
    agree = (logits[0].argmax(0).numpy() == prediction.label_map.array[:, :, k]).mean()
    assert agree >= 0.999


def test_bundled_trained_model_default_runtime_matches_monai():
    from medseg.package import BUNDLED_MODELS
    from medseg.package import ModelPackage as Package

    if not (BUNDLED_MODELS / "hippocampus" / "configs" / "metadata.json").is_file():
        pytest.skip("no bundled hippocampus model")
    trained = Package(BUNDLED_MODELS / "hippocampus")
    predictor = Predictor(trained)  # runtime auto: OpenVINO on the CPU when installed
    network = trained.load_network()
    for case in ("hippocampus_001.nii.gz", "hippocampus_004.nii.gz"):
        image = read_image(shared_path("hippocampus", "imagesTr", case))
        prediction = predictor.predict(image, return_probabilities=True)
        labels, probabilities = monai_reference(network, trained.card, image)
        assert np.abs(prediction.probabilities - probabilities).max() <= 1e-3
        assert (prediction.label_map.array == labels).mean() >= 0.999
        assert prediction.statistics[0]["voxels"] > 0  # a trained model finds the hippocampus


def test_from_network_is_the_packaged_predictor_without_a_package(resampling_package, hippocampus):
    """Training validates through ``Predictor.from_network``: the same label map, statistics and
    work budget as the exported package gives users."""
    from medseg.errors import WorkBudgetError

    packaged = Predictor(resampling_package, runtime="eager").predict(hippocampus)
    in_memory = Predictor.from_network(resampling_package.load_network(), resampling_package.card)
    result = in_memory.predict(hippocampus)
    np.testing.assert_array_equal(result.label_map.array, packaged.label_map.array)
    np.testing.assert_array_equal(result.label_map.affine, hippocampus.affine)
    assert result.statistics == packaged.statistics
    limited = Predictor.from_network(resampling_package.load_network(), resampling_package.card, max_windows=1)
    with pytest.raises(WorkBudgetError, match="limit of 1"):
        limited.predict(hippocampus)
