"""Training: config (:mod:`medseg.training.config`), the loop and export (:mod:`medseg.training.trainer`),
cross-validation of a run's folds (:mod:`medseg.training.cross_validation`)."""

from medseg.training.config import TrainConfig, load_config
from medseg.training.trainer import Trainer, TrainResult, run_finished, trainer_for

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_config", "run_finished", "trainer_for"]
