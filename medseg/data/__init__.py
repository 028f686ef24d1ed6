"""Training data: case discovery (:mod:`~medseg.data.cases`), fingerprint and plan
(:mod:`~medseg.data.plan`) and MONAI transform chains (:mod:`~medseg.data.transforms`)."""

from medseg.data.cases import Case, find_cases
from medseg.data.plan import (
    Fingerprint,
    Plan,
    compute_fingerprint,
    make_folds,
    make_plan,
)

__all__ = ["Case", "Fingerprint", "Plan", "compute_fingerprint", "find_cases", "make_folds", "make_plan"]
