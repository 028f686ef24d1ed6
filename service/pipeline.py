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

# result names in the API -> write_outputs format names
RESULT_FORMATS = {"seg": "seg", "nifti": "nifti", "report": "json", "preview": "png", "rtstruct": "rtstruct"}
MEDIA_TYPES = {
    "seg": "application/dicom",
    "nifti": "application/gzip",
    "report": "application/json",
    "preview": "image/png",
    "rtstruct": "application/dicom",
}


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
    job_input: dict,
    model: str,
    options: dict,
    predictors: PredictorCache,
    progress: Callable[..., None] | None = None,
    policy=None,
    checkpoint: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Segment one job's input; returns ``{"results", "timings", "statistics"}``.

    ``results`` maps result names (seg, nifti, report, preview) to paths relative to ``job_dir``.
    Timings are in seconds. ``policy`` (:class:`medseg.io.safety.ReadPolicy`) is what reading the
    input may touch, as at upload. ``checkpoint`` is called (unthrottled, unlike ``progress``)
    between inference and writing, so a job deleted meanwhile writes nothing. Raises any
    :class:`medseg.errors.MedsegError` of the steps, and whatever ``checkpoint`` raises.
    """
    from medseg.io import read_image
    from medseg.outputs import write_outputs

    timings: dict[str, float] = {}
    start = time.perf_counter()
    from medseg.io.safety import ReadPolicy

    image = read_image(
        job_dir / job_input["path"],
        series_uid=job_input.get("series_uid"),
        policy=policy or ReadPolicy(detached_data="refuse"),
    )
    timings["read_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    predictor = predictors.get(model, options.get("tta", False), options.get("overlap"))
    timings["load_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    prediction = predictor.predict(image, progress=progress)
    timings["predict_s"] = time.perf_counter() - mark
    for name, value in (getattr(prediction, "timings", None) or {}).items():
        if isinstance(value, (int, float)):
            timings[f"predict.{name}"] = float(value)

    if checkpoint is not None:
        checkpoint()
    mark = time.perf_counter()
    formats = tuple(RESULT_FORMATS[name] for name in options["formats"])
    partial, final = job_dir / "output.partial", job_dir / "output"
    shutil.rmtree(partial, ignore_errors=True)
    warnings: list[str] = []  # e.g. SEG patient/study attributes repaired (keywords, no values)
    paths = write_outputs(prediction, image, predictor.package.card, partial, formats=formats, warnings=warnings)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    timings["write_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start

    by_format = {fmt: Path(p) for fmt, p in paths.items()}
    results = {}
    for name, fmt in RESULT_FORMATS.items():
        if fmt in by_format:
            results[name] = str(Path("output") / by_format[fmt].relative_to(partial))
    statistics = getattr(prediction, "statistics", None)
    return {"results": results, "timings": timings, "statistics": _jsonable(statistics), "warnings": warnings}


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
