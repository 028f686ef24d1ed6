"""The job contract: a job's options, its input and its result, as typed models, and the result names.

One definition each, used end to end: :class:`JobOptions` is parsed from the form fields of
``POST /v1/jobs`` (or made by ``medseg predict --broker`` and STOW-RS), :class:`JobInput` is made
when an upload is checked (:func:`service.inputs.prepare_input`), both are stored in the job's JSON
columns (``model_dump(mode="json")``: the same keys rows have always had, so rows written by
earlier versions read back unchanged), handed to :func:`service.pipeline.run_job`, which returns a
:class:`JobResult`; the API layer (:func:`service.jobs.job_view`) turns them into its JSON.

Result names (``seg``, ``nifti``, ``report``, ``preview``, ``rtstruct``) are the keys of
:data:`RESULT_FORMATS`; every other list of them in the service derives from it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medseg.outputs import DICOM_ONLY_FORMATS
from medseg.package import MODEL_NAME_PATTERN

#: result names in the API -> :func:`medseg.outputs.write_outputs` format names
RESULT_FORMATS = {"seg": "seg", "nifti": "nifti", "report": "json", "preview": "png", "rtstruct": "rtstruct"}
#: result name -> media type of its download
MEDIA_TYPES = {
    "seg": "application/dicom",
    "nifti": "application/gzip",
    "report": "application/json",
    "preview": "image/png",
    "rtstruct": "application/dicom",
}
#: results that need DICOM input (they reference the source instances; medseg.outputs says which)
DICOM_ONLY = tuple(name for name, fmt in RESULT_FORMATS.items() if fmt in DICOM_ONLY_FORMATS)
#: results written only when asked for (not in the default "all that fit the input")
OPT_IN = ("rtstruct",)
MAX_OVERLAP = 0.9  # the work grows as 1 / (1 - overlap) ** 3: 0.99 is a million times 0.5

assert set(MEDIA_TYPES) == set(RESULT_FORMATS) and set(DICOM_ONLY + OPT_IN) <= set(RESULT_FORMATS)


def default_results(kind: str) -> list[str]:
    """The results a job writes when none are asked for: every result that fits an input of
    ``kind`` (``dicom`` or ``volume``), except the opt-in ones (:data:`OPT_IN`)."""
    return [name for name in RESULT_FORMATS if name not in OPT_IN and (kind == "dicom" or name not in DICOM_ONLY)]


class JobOptions(BaseModel):
    """Options of a job: the form fields of ``POST /v1/jobs``, and what a job stores of them.

    ``model`` and ``series_uid`` pick the model and the series at upload; they are kept in the job
    row's ``model`` column and in :attr:`JobInput.series_uid`, so the stored options
    (:meth:`stored`) hold only ``tta``, ``overlap`` and ``formats`` (resolved at upload).
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        max_length=100,
        pattern=MODEL_NAME_PATTERN,
        description="a registered model name (GET /v1/models), never a path; default: the service's",
    )
    series_uid: str | None = Field(
        None, max_length=200, description="series to segment when the upload holds several (SeriesInstanceUID)"
    )
    tta: bool = Field(False, description="test-time augmentation (mirroring)")
    overlap: float | None = Field(
        None, ge=0.0, le=MAX_OVERLAP, description="sliding-window overlap in [0, 0.9]; default: the model card's"
    )
    formats: list[str] | None = Field(
        None,
        description=f"results to write: {', '.join(RESULT_FORMATS)} (default: all that fit the input, "
        f"except {', '.join(OPT_IN)}; {' and '.join(DICOM_ONLY)} need DICOM input)",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
            unknown = sorted(set(value) - set(RESULT_FORMATS))
            if unknown:
                raise ValueError(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(RESULT_FORMATS)})")
            return sorted(set(value), key=list(RESULT_FORMATS).index) or None
        return value

    def stored(self) -> dict[str, Any]:
        """What the job row's ``options`` column holds: ``{"tta", "overlap", "formats"}``."""
        return self.model_dump(mode="json", include={"tta", "overlap", "formats"})

    @classmethod
    def from_row(cls, value: dict[str, Any] | None) -> JobOptions:
        """The options of a stored row (any version; an empty row gives the defaults).

        Raises:
            pydantic.ValidationError: the row holds values no version wrote.
        """
        return cls.model_validate({k: v for k, v in (value or {}).items() if k in cls.model_fields})


class JobInput(BaseModel):
    """What a job segments: the checked upload (or STOW-RS series), as stored in ``jobs.input``.

    Fields not known for a job (a STOW-RS series is not opened before its job runs) are left
    unset and are not stored; :meth:`stored` and :meth:`shown` keep exactly the keys that were set.
    """

    model_config = ConfigDict(extra="ignore")

    kind: Literal["dicom", "volume"] = Field("dicom", description="dicom: DICOM instances; volume: one volume file")
    path: str = Field("input", description="the input, relative to the job folder (input/ or input/<file>)")
    series_uid: str | None = Field(
        None, description="SeriesInstanceUID (or series part) to read; null for a single volume file"
    )
    study_uid: str | None = Field(None, description="StudyInstanceUID, when known")
    modality: str | None = Field(None, description="DICOM Modality (CT, MR...), when known")
    instances: int | None = Field(None, description="image instances of the series (1 for a volume file)")
    shape: list[int] | None = Field(None, description="spatial grid (I, J, K) in voxels, from the headers")
    spacing: list[float] | None = Field(None, description="voxel size along i, j, k in mm, from the headers")
    warnings: list[str] = Field(default_factory=list, description="what reading skipped or repaired (no values)")
    formats: list[str] | None = Field(None, description="the results asked for (result names), resolved at upload")
    validate_s: float = Field(0.0, exclude=True, description="seconds the upload checks took (kept in timings)")

    def stored(self) -> dict[str, Any]:
        """The ``jobs.input`` column: the fields that were set, as JSON."""
        return self.model_dump(mode="json", exclude_unset=True)

    def shown(self) -> dict[str, Any]:
        """The ``input`` of the API's job view: as stored, less the server path and formats."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"path", "formats"})

    @classmethod
    def from_row(cls, value: dict[str, Any] | None) -> JobInput:
        """The input of a stored row (any version).

        Raises:
            pydantic.ValidationError: the row holds values no version wrote.
        """
        return cls.model_validate(value or {})


class LabelStatistics(BaseModel):
    """One label of the report's statistics (:func:`medseg.inference.statistics.label_statistics`)."""

    model_config = ConfigDict(extra="allow")

    id: int
    name: str
    voxels: int = Field(description="voxels of the label on the input grid")
    volume_ml: float = Field(description="volume in ml")
    mean_intensity: float | None = Field(None, description="mean image value inside the label (HU for CT)")


class JobResult(BaseModel):
    """What :func:`service.pipeline.run_job` returns for a job that ran to the end."""

    results: dict[str, str] = Field(
        default_factory=dict, description="result name -> file path relative to the job folder"
    )
    timings: dict[str, float] = Field(
        default_factory=dict, description="seconds: read_s, load_s, predict_s (and predict.<step>), write_s, total_s"
    )
    statistics: list[LabelStatistics] | None = Field(None, description="volumes (ml) per label of the model card")
    warnings: list[str] = Field(
        default_factory=list, description="what reading and writing skipped or repaired (attribute keywords, no values)"
    )

    def stored_statistics(self) -> list[dict[str, Any]] | None:
        """The ``jobs.statistics`` column."""
        if self.statistics is None:
            return None
        return [item.model_dump(mode="json") for item in self.statistics]


__all__ = [
    "RESULT_FORMATS",
    "MEDIA_TYPES",
    "DICOM_ONLY",
    "OPT_IN",
    "MAX_OVERLAP",
    "default_results",
    "JobOptions",
    "JobInput",
    "JobResult",
    "LabelStatistics",
]
