"""Training: config (:mod:`medseg.training.config`), the loop and export (:mod:`medseg.training.trainer`),
the nuclei trainer (:mod:`medseg.training.nuclei`), cross-validation of a run's folds
(:mod:`medseg.training.cross_validation`)."""

from medseg.training.config import TrainConfig, load_config
from medseg.training.nuclei import NucleiTrainer
from medseg.training.trainer import Trainer, TrainResult, run_finished


def trainer_for(config: TrainConfig) -> type[Trainer]:
    """The trainer class of ``config.task``: :class:`Trainer`, or :class:`NucleiTrainer` for ``nuclei``."""
    return NucleiTrainer if config.task == "nuclei" else Trainer


__all__ = ["NucleiTrainer", "TrainConfig", "TrainResult", "Trainer", "load_config", "run_finished", "trainer_for"]
