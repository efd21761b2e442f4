"""Amortized models: the Distribution Transformer, its training loop and checkpoints."""

from flashbayes._padding import size_bucket
from flashbayes.amortized._checkpoint import FORMAT_VERSION, CheckpointError
from flashbayes.amortized._dt import DistributionTransformer, DTConfig
from flashbayes.amortized._model import (
    PRETRAINED,
    AmortizedPosterior,
    OutOfRangeWarning,
    load,
    load_pretrained,
)
from flashbayes.amortized._train import (
    TrainConfig,
    TrainEvent,
    TrainingError,
    batch_loss,
    latest_checkpoint,
    train,
)

__all__ = ["FORMAT_VERSION", "PRETRAINED", "AmortizedPosterior", "CheckpointError", "DTConfig",
           "DistributionTransformer", "OutOfRangeWarning", "TrainConfig", "TrainEvent",
           "TrainingError", "batch_loss", "latest_checkpoint", "load", "load_pretrained",
           "size_bucket", "train"]
