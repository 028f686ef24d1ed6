"""MONAI Bundle compatibility of model packages: metadata verified against the shipped schema,
and ``monai.bundle run`` of ``configs/inference.json`` agreeing with ``medseg predict``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.package import (
    BUNDLE_SCHEMA,
    INFERENCE,
    METADATA,
    WEIGHTS,
    ModelPackage,
    dynunet_kwargs,
    monai_inference_config,
    resolve_model,
)
from tests.conftest import shared_path


def test_bundled_weights_unchanged_and_inference_config_current():
    package = resolve_model("hippocampus")
    digest = hashlib.sha256((package.path / WEIGHTS).read_bytes()).hexdigest()
    assert digest == package.card.weights_sha256
    shipped = json.loads((package.path / INFERENCE).read_text())
    assert shipped == monai_inference_config(package.card)


def test_bundled_metadata_passes_verify_metadata(tmp_path):
    from monai.bundle import verify_metadata

    package = resolve_model("hippocampus")
    verify_metadata(meta_file=str(package.path / METADATA), filepath=str(BUNDLE_SCHEMA))
    broken = json.loads((package.path / METADATA).read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(BUNDLE_SCHEMA))


def test_state_dict_loads_into_plain_monai_dynunet():
    from monai.networks.nets import DynUNet

    package = resolve_model("hippocampus")
    network = DynUNet(**dynunet_kwargs(package.card.network.config)).eval()
    state = torch.load(package.path / WEIGHTS, map_location="cpu", weights_only=True)
    network.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    medseg_net = package.load_network()
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        expected = medseg_net(x)
        expected = getattr(expected, "logits", expected)
        torch.testing.assert_close(network(x), expected)


def test_save_writes_inference_json_for_unet_only(tmp_path):
    card = resolve_model("hippocampus").card
    tiny = card.model_copy(
        update={
            "network": card.network.model_copy(
                update={
                    "config": dict(
                        spatial_dims=3, in_channels=1, out_channels=3, filters=[4, 8, 16], deep_supervision=0
                    )
                }
            )
        }
    )
    from medseg.networks import create_network

    state = create_network("unet", **tiny.network.config).state_dict()
    saved = ModelPackage.save(tmp_path / "tiny", tiny, state)
    config = json.loads((saved.path / INFERENCE).read_text())
    assert config["network_def"]["_target_"] == "DynUNet"
    assert config["network_def"]["deep_supervision"] is False
    other = tiny.model_copy(update={"network": tiny.network.model_copy(update={"name": "swin"})})
    (tmp_path / "other").mkdir()
    skipped = ModelPackage.save(tmp_path / "other" / "pkg", other, state)
    assert not (skipped.path / INFERENCE).exists()
    metadata = json.loads((skipped.path / METADATA).read_text())
    assert "no MONAI equivalent" in metadata["medseg_bundle_note"]


def test_monai_bundle_run_matches_medseg_predict(tmp_path):
    image = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(image, inputs / image.name)
    bundle = resolve_model("hippocampus").path
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / INFERENCE),
        "--meta_file",
        str(bundle / METADATA),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(tmp_path / "bundle_out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        main(
            [
                "predict",
                str(inputs / image.name),
                "--model",
                "hippocampus",
                "--output",
                str(tmp_path / "medseg_out"),
                "--formats",
                "nifti",
            ]
        )
        == 0
    )
    [ours] = (tmp_path / "medseg_out").glob("*.nii.gz")
    theirs = nib.load(tmp_path / "bundle_out" / "hippocampus_001_seg.nii.gz")
    ours = nib.load(ours)
    a = np.asarray(theirs.dataobj).squeeze()
    b = np.asarray(ours.dataobj)
    assert a.shape == b.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-4)
    agreement = float((a == b).mean())
    print(f"monai.bundle run vs medseg predict: {100 * agreement:.3f} % voxels agree")
    assert agreement >= 0.99
    assert set(np.unique(a)) == set(np.unique(b)) == {0, 1, 2}
