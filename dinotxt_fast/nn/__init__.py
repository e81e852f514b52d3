"""Drop-in torch modules backed by dinotxt-fast's ops, and `patch_model` to swap them into existing models."""
from .contrastive import ContrastiveLoss
from .patch import FusedSelfAttention, PatchResult, attention_refusal, is_attention_module, patch_model, unpatch_model

__all__ = ["ContrastiveLoss", "FusedSelfAttention", "PatchResult", "attention_refusal", "is_attention_module",
           "patch_model", "unpatch_model"]
