"""The sliding-window engine against MONAI's ``sliding_window_inference`` (the reference)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference as monai_sliding_window_inference

from medseg.inference import MirrorEnsemble, sliding_window_inference
from medseg.inference.engine import grid_windows, stitching_bytes
from tests.conftest import shared_path

TOLERANCE = 1e-4  # max abs difference relative to the output range


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    span = float(reference.max() - reference.min()) or 1.0
    assert float((ours - reference).abs().max()) <= TOLERANCE * span


def _conv(dims: int, in_channels: int, out_channels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(in_channels, out_channels, 3, padding=1)
    return conv.eval()


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_matches_monai_3d(mode, overlap, sw_batch_size):
    network = _conv(3, 2, 4)
    x = torch.randn(2, 2, 37, 50, 29)  # last axis smaller than the window: padded and cropped
    roi = (16, 24, 32)
    with torch.no_grad():
        reference = monai_sliding_window_inference(x, roi, sw_batch_size, network, overlap, mode)
    ours = sliding_window_inference(x, roi, sw_batch_size, network, overlap, mode)
    _close(ours, reference)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.1, 0.6])
def test_matches_monai_2d_anisotropic_overlap(mode, overlap):
    network = _conv(2, 1, 3)
    x = torch.randn(1, 1, 70, 45)
    with torch.no_grad():
        reference = monai_sliding_window_inference(
            x, (32, 64), 2, network, (overlap, 0.3), mode, sigma_scale=(0.125, 0.2)
        )
    ours = sliding_window_inference(x, (32, 64), 2, network, (overlap, 0.3), mode, sigma_scale=(0.125, 0.2))
    _close(ours, reference)


def test_input_smaller_than_window_and_whole_axis_roi():
    network = _conv(3, 1, 2)
    x = torch.randn(1, 1, 10, 12, 9)
    with torch.no_grad():
        reference = monai_sliding_window_inference(
            x, (16, -1, 16), 1, network, 0.5, "gaussian", padding_mode="replicate"
        )
    ours = sliding_window_inference(x, (16, -1, 16), 1, network, 0.5, "gaussian", padding_mode="replicate")
    assert ours.shape == (1, 2, 10, 12, 9)
    _close(ours, reference)


def test_real_hippocampus_image_matches_monai():
    path = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    x = torch.from_numpy((volume - volume.mean()) / volume.std())[None, None]
    network = _conv(3, 1, 3, seed=1)
    for mode, overlap, batch in (("gaussian", 0.5, 4), ("constant", 0.25, 1)):
        with torch.no_grad():
            reference = monai_sliding_window_inference(x, (24, 32, 24), batch, network, overlap, mode)
        _close(sliding_window_inference(x, (24, 32, 24), batch, network, overlap, mode), reference)


def test_tuple_dict_and_lower_resolution_outputs():
    network = _conv(3, 1, 2)

    def predictor(windows):
        logits = network(windows)
        return {"full": logits, "half": torch.nn.functional.avg_pool3d(logits, 2)}

    x = torch.randn(1, 1, 40, 36, 20)
    with torch.no_grad():
        reference = monai_sliding_window_inference(x, (16, 16, 16), 2, predictor, 0.5, "gaussian")
    ours = sliding_window_inference(x, (16, 16, 16), 2, predictor, 0.5, "gaussian")
    assert sorted(ours) == ["full", "half"]
    for key in ours:
        _close(ours[key], reference[key])
    pair = sliding_window_inference(x, (16, 16, 16), 2, lambda w: (network(w), -network(w)), 0.5)
    assert isinstance(pair, tuple) and torch.allclose(pair[0], -pair[1])


def test_meta_tensor_kept_and_result_writable():
    network = _conv(3, 1, 2)
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    x = MetaTensor(torch.randn(1, 1, 20, 20, 20), affine=affine)
    out = sliding_window_inference(x, (16, 16, 16), 1, network, 0.5)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    out /= 2  # not an inference-mode tensor: callers may modify it in place


def test_float16_accumulator_and_cpu_output():
    network = _conv(3, 1, 4)
    x = torch.randn(1, 1, 30, 30, 30)
    reference = sliding_window_inference(x, (16, 16, 16), 2, network, 0.5, "gaussian")
    half = sliding_window_inference(
        x, (16, 16, 16), 2, network, 0.5, "gaussian", accumulator_dtype=torch.float16, device="cpu"
    )
    assert half.dtype == torch.float16
    span = float(reference.max() - reference.min())
    assert float((half.float() - reference).abs().max()) <= 2e-3 * span
    assert stitching_bytes((512, 512, 300), 100, accumulator_dtype=torch.float16) == 512 * 512 * 300 * (100 * 2 + 4)


def test_progress_callback_and_window_count():
    network = _conv(3, 1, 2)
    x = torch.randn(1, 1, 40, 30, 20)
    calls = []
    sliding_window_inference(x, (16, 16, 16), 3, network, 0.5, progress=lambda done, total: calls.append((done, total)))
    total = grid_windows((40, 30, 20), (16, 16, 16), 0.5)
    assert calls[-1] == (total, total) and len(calls) == -(-total // 3)


def test_process_fn_and_buffering_delegate_to_monai():
    network = _conv(3, 1, 2)
    x = torch.randn(1, 1, 40, 30, 20)
    with torch.no_grad():
        reference = monai_sliding_window_inference(x, (16, 16, 16), 2, network, 0.5, "gaussian", buffer_steps=2)
    ours = sliding_window_inference(x, (16, 16, 16), 2, network, 0.5, "gaussian", buffer_steps=2)
    _close(ours, reference)


def test_bad_arguments_raise_like_monai():
    network = _conv(3, 1, 2)
    with pytest.raises(ValueError, match="dimensions"):
        sliding_window_inference(torch.randn(1, 1, 8, 8), (4, 4, 4), 1, network)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.randn(1, 1, 8, 8, 8), (4, 4, 4), 1, network, overlap=1.0)


def test_mirror_ensemble_averages_flips_and_networks():
    first, second = _conv(3, 1, 2, seed=0), _conv(3, 1, 2, seed=1)
    x = torch.randn(2, 1, 8, 9, 10)
    ensemble = MirrorEnsemble([first, second], mirror_axes=(0, 2))
    assert ensemble.passes == 8
    expected = torch.zeros(2, 2, 8, 9, 10)
    with torch.no_grad():
        for network in (first, second):
            for dims in ([], [2], [4], [2, 4]):
                flipped = torch.flip(x, dims) if dims else x
                y = network(flipped)
                expected += torch.flip(y, dims) if dims else y
        assert torch.allclose(ensemble(x), expected / 8, atol=1e-6)
    # a network that is mirror-symmetric in its output gives the plain output back
    with torch.no_grad():
        assert torch.allclose(MirrorEnsemble([first])(x), first(x))


@pytest.mark.parametrize("size", [(35, 50, 36), (31, 40, 24), (64, 64, 64), (20, 96, 33)])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_window_grid_and_importance_map_equal_monai(size, overlap):
    from monai.data.utils import compute_importance_map, dense_patch_slices

    from medseg.inference.engine import importance_map, scan_interval, window_slices

    roi = (32, 48, 32)
    padded = tuple(max(s, r) for s, r in zip(size, roi))
    interval = scan_interval(padded, roi, (overlap,) * 3)
    assert window_slices(padded, roi, interval) == dense_patch_slices(padded, roi, interval)
    assert len(window_slices(padded, roi, interval)) == grid_windows(size, roi, overlap)
    for mode in ("gaussian", "constant"):
        ours = importance_map(roi, mode, 0.125)
        theirs = compute_importance_map(roi, mode=mode, sigma_scale=0.125).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
        assert not ours.flags.writeable


@pytest.mark.parametrize("shape", [(1, 2, 40, 50, 36), (2, 1, 20, 30, 18)])
def test_numpy_inputs_give_the_tensor_result(shape):
    """A NumPy input with a NumPy predictor (the OpenVINO runtime) stitches the same logits as
    the tensor path (and MONAI's), padding included; the result is a NumPy array."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    conv = torch.nn.Conv3d(shape[1], 3, 3, padding=1).eval()

    def numpy_network(windows):
        with torch.no_grad():
            return conv(torch.from_numpy(np.ascontiguousarray(windows))).numpy()

    ours = sliding_window_inference(x, (24, 32, 24), 2, numpy_network, overlap=0.5, mode="gaussian")
    tensor = sliding_window_inference(torch.from_numpy(x), (24, 32, 24), 2, conv, overlap=0.5, mode="gaussian")
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, tensor.numpy(), rtol=1e-5, atol=1e-5)
    half = sliding_window_inference(x, (24, 32, 24), 1, numpy_network, 0.5, "gaussian", accumulator_dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, tensor.numpy(), rtol=1e-2, atol=1e-2)
    mirrored = MirrorEnsemble([numpy_network], mirror_axes=(0, 2))(x[:, :, :24, :32, :24])
    expected = MirrorEnsemble([conv], mirror_axes=(0, 2))(torch.from_numpy(x[:, :, :24, :32, :24]))
    np.testing.assert_allclose(mirrored, expected.detach().numpy(), rtol=1e-5, atol=1e-5)
