"""dlm: the thin layer over dlm_kernels: train and sample masked diffusion language models.

    from dlm import Trainer, get_preset
    Trainer(get_preset("shakespeare-tiny")).fit()

Calls only the public dlm_kernels API (never Triton directly).
"""

from dlm.config import Config, DataConfig, ModelConfig, TrainConfig, get_preset
from dlm.loss import DiffusionObjective
from dlm.model import DiffusionLM
from dlm.schedules import get_schedule

__all__ = [
    "Config",
    "DataConfig",
    "DiffusionLM",
    "DiffusionObjective",
    "ModelConfig",
    "TrainConfig",
    "Trainer",
    "get_preset",
    "get_schedule",
]


def __getattr__(name):
    # The trainer pulls in safetensors, tqdm and torch.distributed: import it on first use.
    if name == "Trainer":
        from dlm.trainer import Trainer

        return Trainer
    raise AttributeError(name)
