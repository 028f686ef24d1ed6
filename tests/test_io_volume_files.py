"""NIfTI / NRRD / MetaImage inputs through find_series and read_image."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MixedSeriesError
from medseg.io import find_series, read_image
from tests.conftest import shared_path


def test_nifti_file_is_one_series_with_its_own_affine():
    path = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    [info] = find_series(path)
    assert info.uid == str(path) and info.format == "nifti" and info.instance_count == 1
    image = info.read()
    reference = nib.load(path)
    np.testing.assert_array_equal(image.affine, reference.affine)
    np.testing.assert_array_equal(image.array, np.asanyarray(reference.dataobj))
    assert image.dicom_source is None


def test_modality_from_sidecar_json_or_file_name():
    [info] = find_series(shared_path("dicom", "dcm_qa_ts", "Ref", "1.nii"))  # dcm2niix 1.json
    assert info.modality == "MR"
    [ct] = find_series(shared_path("ct_mr_multilabel", "example_ct_sm.nii.gz"))
    [mr] = find_series(shared_path("ct_mr_multilabel", "example_mr_sm.nii.gz"))
    assert (ct.modality, mr.modality) == ("CT", "MR")
    [unknown] = find_series(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    assert unknown.modality == ""


def test_folder_and_zip_with_volume_files_and_dicom(tmp_path):
    nifti = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    dicom = shared_path("dicom", "hippocampus_crop_study1")
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(nifti, "volumes/case.nii.gz")
        for path in sorted(dicom.iterdir()):
            handle.write(path, f"dicom/{path.name}")
    series = find_series(archive)
    assert sorted(s.format for s in series) == ["dicom", "nifti"]
    with pytest.raises(MixedSeriesError):
        read_image(archive)
    volume = read_image(archive, series_uid="volumes/case.nii.gz")
    np.testing.assert_array_equal(volume.array, np.asanyarray(nib.load(nifti).dataobj))
