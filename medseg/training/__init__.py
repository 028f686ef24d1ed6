"""Training: config (:mod:`medseg.training.config`), the loop and export (:mod:`medseg.training.trainer`),
the nuclei trainer (:mod:`medseg.training.nuclei`), cross-validation of a run's folds
(:mod:`medseg.training.cross_validation`)."""

from medseg.training.config import TrainConfig, load_config
from medseg.training.trainer import Trainer, TrainResult, run_finished


def trainer_for(config: TrainConfig) -> type[Trainer]:
    """The trainer class of ``config.task``: :class:`Trainer`, or
    :class:`medseg.training.nuclei.NucleiTrainer` for ``nuclei`` (imported only then: the tile
    path's scikit-image post-processing costs 2 s of start-up)."""
    if config.task == "nuclei":
        from medseg.training.nuclei import NucleiTrainer

        return NucleiTrainer
    return Trainer


__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_config", "run_finished", "trainer_for"]
