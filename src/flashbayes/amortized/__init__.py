"""Amortized models: the Distribution Transformer, its training loop and checkpoints."""

from flashbayes._padding import size_bucket
from flashbayes.amortized._checkpoint import FORMAT_VERSION, CheckpointError
from flashbayes.amortized._dt import DistributionTransformer, DTConfig
from flashbayes.amortized._model import (
    DT_PRETRAINED,
    GP_PRETRAINED,
    PRETRAINED,
    AmortizedPosterior,
    OutOfRangeWarning,
    load,
    load_pretrained,
)
from flashbayes.amortized._parallel import (
    DistributedError,
    ProcessGroup,
    data_mesh,
    initialize_distributed,
    request_cpu_devices,
)
from flashbayes.amortized._train import (
    TrainConfig,
    TrainEvent,
    TrainingError,
    batch_loss,
    fit_network,
    latest_checkpoint,
    train,
)

__all__ = ["DT_PRETRAINED", "FORMAT_VERSION", "GP_PRETRAINED", "PRETRAINED", "AmortizedPosterior",
           "CheckpointError", "DTConfig", "DistributedError", "DistributionTransformer",
           "OutOfRangeWarning", "ProcessGroup", "TrainConfig", "TrainEvent", "TrainingError",
           "batch_loss", "data_mesh", "fit_network", "initialize_distributed", "latest_checkpoint",
           "load", "load_pretrained", "request_cpu_devices", "size_bucket", "train"]
