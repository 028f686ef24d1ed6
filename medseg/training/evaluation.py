"""Re-measure an exported model package on its training fold, the way the trainer validated it.

One implementation shared by ``scripts/revalidate.py`` and ``benchmarks/leaderboard.py``: the
:class:`~medseg.training.trainer.Trainer` of the package's config is built for ``fold`` (same plan,
same validation cases, each read by :mod:`medseg.io`), the package's weights are loaded into its
network, and the trainer's own validation runs (``Predictor.from_network`` on each case's grid,
then Dice and HD95 in mm on that grid).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from medseg.package import ModelPackage


def validate_package(
    config_path: str | Path, package: ModelPackage, fold: int = 0, keep_images: bool = False
) -> tuple[dict[str, Any], list]:
    """Dice / HD95 (mm) per label of ``package`` on ``fold``'s validation cases.

    Args:
        config_path: the experiment YAML the package was trained from.
        package: the exported package whose weights are measured.
        fold: cross-validation fold (its validation cases are the ones measured).
        keep_images: also return the validation ``[(Image, label array (I, J, K))]``.

    Returns:
        ``(summary, images)``: the trainer's ``best_summary`` (``dice``/``hd95_mm`` per label name
        and ``mean``, ``num_cases``) and the validation images (empty unless ``keep_images``).

    Raises:
        ConfigError, DatasetError: the config or the dataset cannot be used.
    """
    from medseg.training.config import load_config
    from medseg.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="medseg-revalidate-") as tmp:
        trainer = Trainer(load_config(str(config_path), ["data.cache_rate=0"]), tmp, fold=fold)
        trainer.network.load_state_dict(package.load_network().state_dict())
        trainer._validate(epoch=0)
        return trainer.best_summary, (list(trainer.val_images) if keep_images else [])
