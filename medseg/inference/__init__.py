"""Inference: the sliding-window engine, the Predictor and its post-processing and statistics.

- :func:`sliding_window_inference` — MONAI's sliding-window function with less overhead and
  memory-bounded stitching (:mod:`medseg.inference.engine`).
- :class:`Predictor` / :class:`Prediction` — a model package applied to an :class:`~medseg.io.Image`:
  label map on the input grid, per-label statistics, timings (:mod:`medseg.inference.predictor`).
"""

from medseg.inference.engine import MirrorEnsemble, sliding_window_inference

__all__ = ["MirrorEnsemble", "sliding_window_inference", "Predictor", "Prediction"]


def __getattr__(name):  # the predictor pulls in io and networks; import it on first use
    if name in ("Predictor", "Prediction"):
        from medseg.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'medseg.inference' has no attribute {name!r}")
