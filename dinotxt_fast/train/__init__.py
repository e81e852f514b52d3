"""The reference trainer (`dinotxt-fast train`): LiT training of the vision head and text tower on a frozen
backbone, on one process or many (torchrun)."""
from .config import ConfigError, TrainConfig, load_config
from .loop import TrainingStopped, train

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "TrainingStopped"]
