"""The DINO.txt model: backbones (DINOv2, DINOv3), vision head, text tower, tokenizer, presets, checkpoint I/O."""
from .config import PRESETS, DinoTxtConfig, make_config
from .dinotxt import DinoTxt, create_model
from .tokenizer import tokenize

__all__ = ["PRESETS", "DinoTxtConfig", "make_config", "DinoTxt", "create_model", "tokenize"]
