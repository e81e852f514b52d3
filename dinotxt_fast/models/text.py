"""The DINO.txt text tower: a causal pre-norm transformer trained from scratch, pooled at the first EOT token.

Module names follow the official release (`backbone.token_embedding`, `backbone.positional_embedding`,
`backbone.blocks.{i}.{attention_norm, attention.qkv, attention.proj, ffn_norm, feed_forward.fc1,
feed_forward.fc2}`, `backbone.ln_final`, `head.linear_projection`), so the v2 text-encoder file loads as is.

Three exact speedups over the official forward:
- causal attention means a token never sees later ones, and the pooled token is the first EOT, which is the
  largest id (49407): running the blocks on the first `max(argmax(ids)) + 1` positions gives the same result;
- ln_final and the projection act per token, so they run on the pooled token only;
- attention masks the keys after each text's own EOT (`lengths` = EOT + 1), which the pooled token never sees
  anyway, so the attention kernels skip those key blocks for the shorter texts of a batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import DinoTxtConfig
from .layers import Attention, Mlp, is_traceable

TEXT_LN_EPS = 1e-5
TEXT_MLP_RATIO = 4


class TextBlock(nn.Module):
    """Pre-norm causal block: fused qkv without bias, proj with bias, exact-erf GELU MLP, no LayerScale."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=TEXT_LN_EPS)
        self.attention = Attention(dim, num_heads, qkv_bias=False, proj_bias=True, causal=True)
        self.ffn_norm = nn.LayerNorm(dim, eps=TEXT_LN_EPS)
        self.feed_forward = Mlp(dim, TEXT_MLP_RATIO * dim)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`lengths` [B]: tokens of sequence b at positions >= lengths[b] are hidden from attention."""
        x = x + self.attention(self.attention_norm(x), lengths=lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class TextBackbone(nn.Module):
    def __init__(self, config: DinoTxtConfig):
        super().__init__()
        dim = config.text_dim
        self.token_embedding = nn.Embedding(config.vocab_size, dim)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, dim))
        self.blocks = nn.ModuleList(TextBlock(dim, config.text_heads) for _ in range(config.text_layers))
        self.ln_final = nn.LayerNorm(dim, eps=TEXT_LN_EPS)


class TextHead(nn.Module):
    def __init__(self, config: DinoTxtConfig):
        super().__init__()
        self.linear_projection = nn.Linear(config.text_dim, config.embed_dim, bias=False)


class TextTower(nn.Module):
    """Token ids [B, L] (L <= context_length) -> text embeddings [B, embed_dim] (unnormalised)."""

    def __init__(self, config: DinoTxtConfig):
        super().__init__()
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.backbone = TextBackbone(config)
        self.head = TextHead(config)
        self.init_weights()

    def init_weights(self) -> None:
        """The official text init: embeddings N(0, 0.02) / N(0, 0.01), attention std dim^-0.5, output
        projections scaled by (2 * layers)^-0.5, fc1 std (2 dim)^-0.5, projection std dim^-0.5."""
        backbone = self.backbone
        dim = backbone.positional_embedding.shape[1]
        attn_std = dim ** -0.5
        proj_std = attn_std * (2 * len(backbone.blocks)) ** -0.5
        fc_std = (2 * dim) ** -0.5
        nn.init.normal_(backbone.token_embedding.weight, std=0.02)
        nn.init.normal_(backbone.positional_embedding, std=0.01)
        for block in backbone.blocks:
            nn.init.normal_(block.attention.qkv.weight, std=attn_std)
            nn.init.normal_(block.attention.proj.weight, std=proj_std)
            nn.init.zeros_(block.attention.proj.bias)
            nn.init.normal_(block.feed_forward.fc1.weight, std=fc_std)
            nn.init.normal_(block.feed_forward.fc2.weight, std=proj_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        backbone.ln_final.reset_parameters()
        nn.init.normal_(self.head.linear_projection.weight, std=dim ** -0.5)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise a clear error unless ids is a non-empty [B, L] int64 tensor on this device, L <= context
        (the value range is checked in forward, with the one host sync it needs)."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"token ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype != torch.int64:
            raise TypeError(f"token ids must be int64 (torch.long, as dinotxt_fast.tokenize returns), "
                            f"got {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"token ids must be 2-D [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"token ids must be non-empty, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"token ids have length {ids.shape[1]}, longer than the context length "
                             f"{self.context_length}")
        device = self.backbone.positional_embedding.device
        if ids.device != device:
            raise ValueError(f"token ids are on {ids.device} but the text tower is on {device}")

    def forward(self, ids: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """`truncate=False` runs all L positions (same result; avoids the data-dependent length, e.g. for
        torch.compile with static shapes)."""
        self.check_ids(ids)
        eot = ids.argmax(dim=-1)  # first occurrence of the largest id: the first EOT, as the official pooling
        if is_traceable():
            # No host sync for an exported graph: all positions, no key masking (same result, see the docstring).
            return self._encode(ids, eot, None)
        # One host sync for the value check and the truncation length together.
        low, high, longest = torch.stack([ids.min(), ids.max(), eot.max()]).tolist()
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{low}, {high}]")
        if truncate:
            ids = ids[:, : longest + 1]
        # Keys after each text's EOT are masked: the pooled EOT token never sees them (causal), so the result is
        # unchanged, and the attention kernels skip those key blocks.
        return self._encode(ids, eot, eot + 1)

    def _encode(self, ids: torch.Tensor, eot: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        backbone = self.backbone
        x = backbone.token_embedding(ids) + backbone.positional_embedding[: ids.shape[1]]
        for block in backbone.blocks:
            x = block(x, lengths=lengths)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.head.linear_projection(backbone.ln_final(pooled))
