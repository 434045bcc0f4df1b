"""Training with exact gradient accumulation: ``Trainer`` and ``AccumulatingModel``."""

from tfreg.training.trainer import AccumulatingModel, History, Trainer, per_example_loss

__all__ = ["AccumulatingModel", "History", "Trainer", "per_example_loss"]
