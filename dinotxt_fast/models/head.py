"""The DINO.txt vision head: a few pre-norm transformer blocks on the frozen backbone's tokens, then ln_final.

Module names follow the official release (`blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.w1,
mlp.w2, mlp.w3, ls2.gamma}`, `ln_final`); the DINOv2 release file calls the block list `block_list`, which
models/checkpoint.py maps.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DinoTxtConfig
from .layers import (Attention, LayerScale, SwiGLUFFN, drop_add_residual_stochastic_depth, drop_path,
                     init_vit_weights)

HEAD_LN_EPS = 1e-5  # the head uses nn.LayerNorm defaults, unlike the DINOv2 backbone (1e-6)


class HeadBlock(nn.Module):
    """Pre-norm block: fused qkv without bias, proj with bias, LayerScale, SwiGLU FFN with biases."""

    # The DINOv2 release's block switches to per-sample DropPath for rates <= 0.1 (dinov2/layers/block.py); the
    # DINOv3 release's block uses the batch subset at every rate.
    PER_SAMPLE_MAX_RATE = {"dinov2": 0.1, "dinov3": 0.0}

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, layerscale_init: float, drop_path: float,
                 release: str = "dinov2"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=HEAD_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=True)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=HEAD_LN_EPS)
        self.mlp = SwiGLUFFN(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path = drop_path
        self.release = release

    def _attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > self.PER_SAMPLE_MAX_RATE[self.release]:
            # "Batch subset" stochastic depth as in the official block: each residual branch runs on a random
            # subset of the samples and is added back rescaled, which also saves that share of the compute.
            x = drop_add_residual_stochastic_depth(x, self._attn_residual, self.drop_path)
            return drop_add_residual_stochastic_depth(x, self._ffn_residual, self.drop_path)
        if self.training and self.drop_path > 0.0:
            x = x + drop_path(self._attn_residual(x), self.drop_path)
            return x + drop_path(self._ffn_residual(x), self.drop_path)
        x = x + self._attn_residual(x)
        return x + self._ffn_residual(x)


class VisionHead(nn.Module):
    """`head_blocks` HeadBlocks over all backbone tokens ([cls, registers, patches]), then `ln_final`."""

    def __init__(self, config: DinoTxtConfig):
        super().__init__()
        self.dim = config.vision_dim
        self.blocks = nn.ModuleList(
            HeadBlock(config.vision_dim, config.vision_heads, config.head_mlp_hidden,
                      config.head_layerscale_init, config.head_drop_path, release=config.backbone)
            for _ in range(config.head_blocks))
        self.ln_final = nn.LayerNorm(config.vision_dim, eps=HEAD_LN_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """The official head init (timm ViT): truncated normal 0.02 weights, zero biases, LayerScale at init."""
        init_vit_weights(self)

    def forward(self, tokens: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """tokens [B, N, D] -> [B, N, D]. `final_norm=False` skips ln_final, for callers that fuse it
        into the next op (DinoTxt.encode_image pools with ops.patch_pool's fused LayerNorm)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"VisionHead expects tokens [B, N, {self.dim}], got shape {tuple(tokens.shape)}")
        for block in self.blocks:
            tokens = block(tokens)
        return self.ln_final(tokens) if final_norm else tokens
