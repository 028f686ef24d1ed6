"""Write one MSD Hippocampus case (CC-BY-SA 4.0) as a DICOM MR series, the bundled sample.

The DICOM hippocampus crops in ../shared/data/dicom carry no licence, so they are not
redistributed; instead we convert an MSD Task04 NIfTI case (CC-BY-SA 4.0) into an MR Image Storage
series (PS3.3 A.4) with exact geometry: RAS+ affine -> LPS ImagePositionPatient /
ImageOrientationPatient, one instance per k-slice. No patient identifiers: the patient is named
after the data set. Usage::

    python scripts/make_sample_series.py ../shared/data/hippocampus/imagesTr/hippocampus_XXX.nii.gz OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(nifti: Path, out_dir: Path) -> list[Path]:
    image = nib.load(nifti)
    data = np.asarray(image.dataobj)
    if not np.allclose(data, np.round(data)) or data.min() < 0 or data.max() > 65535:
        raise SystemExit(f"{nifti}: pick a case with non-negative integer intensities")
    data = np.round(data).astype(np.uint16)
    affine = image.affine.copy()
    affine[:3] = LPS @ affine[:3]  # RAS+ -> LPS patient coordinates
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cosine = affine[:3, 0] / spacing[0]  # direction of increasing column index = i
    column_cosine = affine[:3, 1] / spacing[1]  # direction of increasing row index = j
    case = nifti.name.split(".")[0]
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=[case, part]) for part in ("study", "series", "frame")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[case, "instance", str(k)])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "MSD^Hippocampus", case
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = "20190101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer = "MR", "MSD Task04 (converted by medseg)"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.SeriesDescription = f"T1 hippocampus crop ({case}, MSD Task04)"
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "NONE", "", "3D"
        ds.ImagePositionPatient = [float(v) for v in affine[:3, :3] @ [0, 0, k] + affine[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.SpacingBetweenSlices = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        path = out_dir / f"{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    written = write_series(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {len(written)} instances to {sys.argv[2]}")
