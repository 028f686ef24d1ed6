"""Training: config (:mod:`medseg.training.config`), the loop and export (:mod:`medseg.training.trainer`)."""

from medseg.training.config import TrainConfig, load_config
from medseg.training.trainer import Trainer, TrainResult, trainer_for

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_config", "trainer_for"]
