"""What a worker does with one job: the same library calls as ``medseg predict``.

read (:func:`medseg.io.read_image`) -> :class:`medseg.inference.Predictor` ->
:func:`medseg.outputs.write_outputs`, into ``<job dir>/output`` (written to a temporary folder,
then renamed). There is no second inference path in the service.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the result names live with the job models; importable from here too (medseg predict --broker)
from service.models import MEDIA_TYPES, RESULT_FORMATS, JobInput, JobOptions, JobResult, default_results


class PredictorCache:
    """The predictors of one worker: each model is loaded once and kept (LRU, ``size`` entries)."""

    def __init__(self, device: str = "cpu", size: int = 2, max_windows: int | None = None):
        self.device, self.size, self.max_windows = device, size, max_windows
        self._predictors: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, tta: bool = False, overlap: float | None = None):
        """A :class:`medseg.inference.Predictor` for ``model`` (a registered name, never a path).

        Raises:
            ModelNotFoundError: the model cannot be resolved.
        """
        from medseg.inference import Predictor
        from medseg.package import resolve_model

        key = (model, bool(tta), overlap)
        with self._lock:
            if key in self._predictors:
                self._predictors.move_to_end(key)
                return self._predictors[key]
        predictor = Predictor(
            resolve_model(model, allow_path=False),
            device=self.device,
            tta=bool(tta),
            overlap=overlap,
            max_windows=self.max_windows,
        )
        with self._lock:
            self._predictors[key] = predictor
            while len(self._predictors) > self.size:
                self._predictors.popitem(last=False)
        return predictor


def run_job(
    job_dir: Path,
    job_input: JobInput,
    model: str,
    options: JobOptions,
    predictors: PredictorCache,
    progress: Callable[..., None] | None = None,
    policy=None,
    checkpoint: Callable[[], None] | None = None,
) -> JobResult:
    """Segment one job's input (the only place the service decodes its pixels).

    Returns a :class:`JobResult`: ``results`` maps result names (:data:`RESULT_FORMATS`) to paths
    relative to ``job_dir``; ``timings`` are in seconds; ``warnings`` what reading and writing
    skipped or repaired. ``options.formats`` None means every result that fits the input
    (:func:`service.models.default_results`). ``policy`` (:class:`medseg.io.safety.ReadPolicy`)
    is what reading the input may touch, as at upload. ``checkpoint`` is called (unthrottled,
    unlike ``progress``) between inference and writing, so a job deleted meanwhile writes nothing.

    Raises:
        MedsegError: any error of the steps - among them an input whose headers passed the upload
            checks but whose pixels cannot be decoded (``UnreadableFileError``,
            ``UnsupportedInputError``), or that does not fit the model once read.
        whatever ``checkpoint`` raises.
    """
    from medseg.errors import ModalityMismatchError, SeriesMismatchError
    from medseg.inference.matching import image_mismatch
    from medseg.io import read_image
    from medseg.io.safety import ReadPolicy
    from medseg.outputs import write_outputs

    timings: dict[str, float] = {}
    start = time.perf_counter()
    image = read_image(
        job_dir / job_input.path,
        series_uid=job_input.series_uid,
        policy=policy or ReadPolicy(detached_data="refuse"),
    )
    timings["read_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    predictor = predictors.get(model, options.tta, options.overlap)
    timings["load_s"] = time.perf_counter() - mark
    # the upload checked the headers; what only the pixels tell (duplicate slices dropped,
    # a resampled stack) is checked again, by the same rule
    reason = image_mismatch(image, predictor.package.card)
    if reason:
        error = ModalityMismatchError if reason.startswith("modality") else SeriesMismatchError
        raise error(f"series {job_input.series_uid or Path(job_input.path).name}: {reason}")

    mark = time.perf_counter()
    prediction = predictor.predict(image, progress=progress)
    timings["predict_s"] = time.perf_counter() - mark
    for name, value in (getattr(prediction, "timings", None) or {}).items():
        if isinstance(value, (int, float)):
            timings[f"predict.{name}"] = float(value)

    if checkpoint is not None:
        checkpoint()
    mark = time.perf_counter()
    names = options.formats or job_input.formats or default_results(job_input.kind)
    formats = tuple(RESULT_FORMATS[name] for name in names)
    partial, final = job_dir / "output.partial", job_dir / "output"
    shutil.rmtree(partial, ignore_errors=True)
    warnings: list[str] = list(image.warnings)  # what reading skipped or repaired
    written: list[str] = []  # e.g. SEG patient/study attributes repaired (keywords, no values)
    paths = write_outputs(prediction, image, predictor.package.card, partial, formats=formats, warnings=written)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    timings["write_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start

    by_format = {fmt: Path(p) for fmt, p in paths.items()}
    results = {}
    for name, fmt in RESULT_FORMATS.items():
        if fmt in by_format:
            results[name] = str(Path("output") / by_format[fmt].relative_to(partial))
    return JobResult(
        results=results,
        timings=timings,
        statistics=_jsonable(getattr(prediction, "statistics", None)),
        warnings=[*warnings, *written],
    )


def _jsonable(value: Any) -> Any:
    """Statistics as plain JSON (numpy scalars and arrays converted)."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


__all__ = ["RESULT_FORMATS", "MEDIA_TYPES", "PredictorCache", "run_job"]
