"""DINOv2 and DINOv3 ViT backbones, state-dict compatible with the official releases.

Both return the final-norm tokens `[B, 1 + R + P, D]` in the order `[cls, registers/storage x R, patches]`,
with patches in row-major order of the `(H / patch, W / patch)` grid. Numerics follow
facebookresearch/dinov2 `dinov2/models/vision_transformer.py` (hub `dinov2_vitl14_reg`: antialiased bicubic
position-embedding resize to an explicit size, no offset) and facebookresearch/dinov3
`dinov3/models/vision_transformer.py` (RoPE on patch tokens, masked key bias) at inference.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import LoadReport, StateDictError, check_state_dict
from ._tables import TableCache, tensor_state
from .config import DinoTxtConfig
from .layers import Attention, LayerScale, Mlp, SwiGLUFFN, SwiGLUFFNFused, init_vit_weights, is_traceable

__all__ = ["DinoV2Backbone", "DinoV3Backbone", "RopePositionEmbedding", "build_backbone"]

def _clear_cache_after_load(module: nn.Module, incompatible_keys) -> None:
    module.clear_cache()


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: [B, 3, H, W] -> [B, (H/p)*(W/p), D], row-major."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        # dinov3/layers/patch_embed.py initialisation
        bound = math.sqrt(1 / (self.proj.in_channels * self.patch_size ** 2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)). `mlp` is an Mlp or a SwiGLU FFN class."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, init_values: float,
                 mask_k_bias: bool = False, mlp: type = Mlp) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, proj_bias=True, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp(dim, mlp_hidden, bias=True)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor, rope: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _ViTBackbone(nn.Module):
    """Shared skeleton: input checks, patch embedding, blocks, final norm, official state-dict I/O."""

    family = ""  # "DINOv2" | "DINOv3", for messages
    swiglu = SwiGLUFFN  # the family's SwiGLU key layout (vision_ffn="swiglu")

    def __init__(self, config: DinoTxtConfig, init_values: float, mask_k_bias: bool) -> None:
        super().__init__()
        if not isinstance(config, DinoTxtConfig):
            raise TypeError(f"expected a DinoTxtConfig, got {type(config).__name__}")
        self.config = config
        self.embed_dim = config.vision_dim
        self.num_heads = config.vision_heads
        self.depth = config.vision_depth
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.num_prefix_tokens = 1 + config.num_register_tokens
        self._init_values = init_values
        self._mask_k_bias = mask_k_bias
        self._cache = TableCache()
        self.register_load_state_dict_post_hook(_clear_cache_after_load)

    def _make_blocks(self) -> nn.ModuleList:
        c = self.config
        mlp = Mlp if c.vision_ffn == "mlp" else self.swiglu
        return nn.ModuleList(
            Block(c.vision_dim, c.vision_heads, c.vision_mlp_hidden, c.backbone_eps, self._init_values,
                  mask_k_bias=self._mask_k_bias, mlp=mlp)
            for _ in range(c.vision_depth))

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # device/dtype moves: drop tables that live on the old device
        return super()._apply(fn, recurse)

    def clear_cache(self) -> None:
        """Drop cached position tables. Needed only after editing parameters through `.data`, which (unlike
        `load_state_dict`, optimizers or in-place ops under no_grad) bypasses the version counter."""
        for module in self.modules():
            if isinstance(getattr(module, "_cache", None), TableCache):
                module._cache.clear()

    # ----------------------------------------------------------------------------------------------- input
    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid (h, w) for an image of `height` x `width` pixels (both multiples of the patch size)."""
        p = self.patch_size
        for name, size in (("height", height), ("width", width)):
            if size < p:
                raise ValueError(f"image {name} {size} is smaller than the patch size {p}")
            if size % p:
                raise ValueError(f"image {name} {size} is not a multiple of the patch size {p} "
                                 f"(resize or pad it to {size - size % p} or {size - size % p + p})")
        return height // p, width // p

    def _embed(self, images: Tensor) -> Tuple[Tensor, int, int]:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB) in dim 1, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (ImageNet-normalised), got {images.dtype}")
        weight = self.patch_embed.proj.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the backbone is on {weight.device}")
        h, w = self.grid_size(images.shape[-2], images.shape[-1])
        if images.dtype != weight.dtype:
            images = images.to(weight.dtype)
        return self.patch_embed(images), h, w

    def _trunk(self, x: Tensor, rope: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        for blk in self.blocks:
            x = blk(x, rope)
        return self.norm(x)

    # ------------------------------------------------------------------------------------- official I/O
    def official_state_dict(self) -> Dict[str, Tensor]:
        """The state dict in the official release's key layout (tensors share storage, like `state_dict()`)."""
        return dict(self.state_dict())

    def _official_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.official_state_dict().items()}

    def load_official_state_dict(self, state_dict, strict: bool = True) -> LoadReport:
        """Load an official backbone checkpoint (already read into a dict of tensors).

        `strict` (default): every official key must be present and nothing else; otherwise missing keys keep
        their current values and unexpected keys are ignored (both returned). Wrong shapes always raise
        `StateDictError`.
        """
        check = check_state_dict(self._official_shapes(), state_dict, strict=strict,
                                 what=f"{self.family} backbone state dict")
        own = self._convert_official(state_dict)
        with torch.no_grad():
            self.load_state_dict(own, strict=False)
        self.clear_cache()
        return check

    def _convert_official(self, state_dict) -> Dict[str, Tensor]:
        expected = self.state_dict()
        return {k: v for k, v in state_dict.items() if k in expected}

class DinoV2Backbone(_ViTBackbone):
    """DINOv2 ViT with registers (hub `dinov2_vitl14_reg`: LayerScale 1.0 at init, LayerNorm eps 1e-6)."""

    family = "DINOv2"
    swiglu = SwiGLUFFNFused  # ViT-g/14: mlp.w12 (both halves), mlp.w3

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__(config, init_values=1.0, mask_k_bias=False)
        if config.backbone != "dinov2":
            raise ValueError(f"DinoV2Backbone needs config.backbone='dinov2', got {config.backbone!r}")
        if config.pos_embed_grid < 1:
            raise ValueError(f"pos_embed_grid must be >= 1, got {config.pos_embed_grid}")
        d, g, r = config.vision_dim, config.pos_embed_grid, config.num_register_tokens
        self.pos_embed_grid = g
        # Registration order gives the official key order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g * g, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, r, d)) if r else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for the checkpoint
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.blocks = self._make_blocks()
        self.norm = nn.LayerNorm(d, eps=config.backbone_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation as in dinov2 `DinoVisionTransformer.init_weights`."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        init_vit_weights(self)
        self.clear_cache()

    def _resize_pos_embed(self, h: int, w: int) -> Tensor:
        g, d = self.pos_embed_grid, self.embed_dim
        pos_embed = self.pos_embed.float()
        patch_pos = pos_embed[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        antialias = self.config.pos_embed_antialias
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1)

    def position_embedding(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """[1, 1 + h*w, D] position embedding for an h x w patch grid (cls first).

        The stored grid is returned as is (the official fast path); other grids are resized in fp32, cast to
        `dtype`, and cached per (grid, dtype, device, pos_embed values) unless a gradient to pos_embed is needed.
        """
        g = self.pos_embed_grid
        if is_traceable():  # exported graphs take any grid: no branch on the symbolic size (same size is exact)
            return self._resize_pos_embed(h, w).to(dtype)
        if (h, w) == (g, g):
            return self.pos_embed
        # Under torch.compile the resize is traced into the graph instead (the cache is Python-side state).
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and self.pos_embed.requires_grad):
            return self._resize_pos_embed(h, w).to(dtype)
        state = tensor_state(self.pos_embed)
        if state is None:
            return self._resize_pos_embed(h, w).to(dtype)
        key = ("pos_embed", h, w, dtype) + state
        table = self._cache.get(key)
        if table is None:
            with torch.no_grad():
                table = self._resize_pos_embed(h, w).to(dtype)
            self._cache.put(key, table)
        return table

    def forward(self, images: Tensor) -> Tensor:
        x, h, w = self._embed(images)
        b = x.shape[0]
        dtype = torch.promote_types(x.dtype, self.cls_token.dtype)
        pos = self.position_embedding(h, w, dtype)
        parts = [(self.cls_token + pos[:, :1]).expand(b, -1, -1)]
        if self.register_tokens is not None:
            parts.append(self.register_tokens.expand(b, -1, -1))
        parts.append(x + pos[:, 1:])
        return self._trunk(torch.cat(parts, dim=1))


class RopePositionEmbedding(nn.Module):
    """DINOv3 axial RoPE tables for a patch grid: base-`base` periods, "separate" coordinate normalisation.

    The official module's train-time coordinate augmentations (shift/jitter/rescale) are not implemented:
    the frozen backbone always computes the eval-mode tables. `periods` is a persistent buffer because the
    official checkpoints contain it (`rope_embed.periods`).
    """

    def __init__(self, embed_dim: int, num_heads: int, base: float) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs the head dim to be a multiple of 4: vision_dim {embed_dim} / "
                             f"vision_heads {num_heads} = {embed_dim / num_heads}")
        self.base = base
        self.head_dim = embed_dim // num_heads
        self.register_buffer("periods", self.compute_periods(), persistent=True)
        self._cache = TableCache()

    def compute_periods(self) -> Tensor:
        d = self.head_dim
        return self.base ** (2 * torch.arange(d // 4, dtype=torch.float32) / (d // 2))

    def _apply(self, fn, recurse=True):
        periods = self.periods
        self._cache.clear()
        super()._apply(fn, recurse)
        if torch.finfo(self.periods.dtype).bits < 32:
            # A model-wide .half()/.to(bfloat16) must not round the frequencies: the tables stay fp32.
            self.periods = periods.to(device=self.periods.device, dtype=torch.float32)
        return self

    def _compute(self, h: int, w: int) -> Tuple[Tensor, Tensor]:
        # Same operations as dinov3 RopePositionEmbedding.forward (coordinates in fp32, "separate").
        dd = {"device": self.periods.device, "dtype": torch.float32}
        coords_h = torch.arange(0.5, h, **dd) / h
        coords_w = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [hw, 2, Dh/4]
        angles = angles.flatten(1, 2).tile(2)  # [hw, Dh]
        return torch.sin(angles), torch.cos(angles)

    def forward(self, h: int, w: int) -> Tuple[Tensor, Tensor]:
        """(sin, cos), each [h*w, head_dim], cached per grid size and periods device/dtype/values."""
        if torch.compiler.is_compiling() or is_traceable():
            return self._compute(h, w)
        state = tensor_state(self.periods)
        if state is None:
            return self._compute(h, w)
        key = (h, w) + state
        tables = self._cache.get(key)
        if tables is None:
            with torch.no_grad():
                tables = self._compute(h, w)
            self._cache.put(key, tables)
        return tables


class DinoV3Backbone(_ViTBackbone):
    """DINOv3 ViT (hub `dinov3_vitl16`): storage tokens, RoPE, LayerNorm eps 1e-5, masked key bias.

    Loading folds each official `blocks.{i}.attn.qkv.bias_mask` into `blocks.{i}.attn.qkv.bias` (the key third
    becomes zero, exactly what the official module computes at run time) and checks `rope_embed.periods`
    against this config; export writes the mask back. The round trip is exact for released checkpoints,
    whose key bias is already zero; otherwise the exported bias is the folded one (same outputs).
    """

    family = "DINOv3"

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__(config, init_values=1e-5, mask_k_bias=True)
        if config.backbone != "dinov3":
            raise ValueError(f"DinoV3Backbone needs config.backbone='dinov3', got {config.backbone!r}")
        d, r = config.vision_dim, config.num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.storage_tokens = nn.Parameter(torch.zeros(1, r, d)) if r else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for the checkpoint
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.rope_embed = RopePositionEmbedding(d, config.vision_heads, config.rope_base)
        self.blocks = self._make_blocks()
        self.norm = nn.LayerNorm(d, eps=config.backbone_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation as in dinov3 `DinoVisionTransformer.init_weights`."""
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        init_vit_weights(self)
        with torch.no_grad():
            self.rope_embed.periods.copy_(self.rope_embed.compute_periods())
        self.clear_cache()

    def forward(self, images: Tensor) -> Tensor:
        x, h, w = self._embed(images)
        b = x.shape[0]
        parts = [self.cls_token.expand(b, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.expand(b, -1, -1))
        parts.append(x)
        return self._trunk(torch.cat(parts, dim=1), rope=self.rope_embed(h, w))

    # The official qkv is `LinearKMaskedBias`: its persistent `bias_mask` (ones, zeros on the key third) is
    # multiplied into the bias at every call. Here it is folded into the bias at load and written back at export.
    def _bias_mask_keys(self):
        return [(f"blocks.{i}.attn.qkv.bias", f"blocks.{i}.attn.qkv.bias_mask") for i in range(self.depth)]

    def standard_bias_mask(self, like: Tensor) -> Tensor:
        """The official key-bias mask (ones, zeros on the key third) in the dtype and device of `like`."""
        d = self.embed_dim
        mask = torch.ones(3 * d, dtype=like.dtype, device=like.device)
        mask[d:2 * d] = 0
        return mask

    def official_state_dict(self) -> Dict[str, Tensor]:
        """Official layout: `state_dict()` plus each block's `attn.qkv.bias_mask` (the standard key mask, so
        the official module computes bias * mask = the folded bias held here)."""
        out: Dict[str, Tensor] = {}
        masks = dict(self._bias_mask_keys())
        for key, value in self.state_dict().items():
            out[key] = value
            if key in masks:
                out[masks[key]] = self.standard_bias_mask(value)
        return out

    def _convert_official(self, state_dict) -> Dict[str, Tensor]:
        own = super()._convert_official(state_dict)
        for bias_key, mask_key in self._bias_mask_keys():
            if mask_key in state_dict:
                mask = state_dict[mask_key]
                expected = self.standard_bias_mask(mask.float())
                if not torch.equal(mask.detach().float(), expected):
                    raise StateDictError(
                        f"{mask_key} is not the DINOv3 key-bias mask (ones, zeros on entries "
                        f"{self.embed_dim}:{2 * self.embed_dim}); this checkpoint's attention differs")
            if bias_key in own:
                bias = own[bias_key]
                # Multiplying by 1 or 0 is exact: this is the official runtime `bias * bias_mask`.
                own[bias_key] = bias * self.standard_bias_mask(bias)
        periods_key = "rope_embed.periods"
        if periods_key in own:
            given = own[periods_key].detach()
            computed = self.rope_embed.compute_periods()
            rtol = max(1e-6, 4 * torch.finfo(given.dtype).eps) if given.is_floating_point() else 0.0
            if not torch.allclose(given.cpu().to(torch.float64), computed.to(torch.float64), rtol=rtol, atol=0.0):
                raise StateDictError(
                    f"{periods_key} in the checkpoint does not match this config's RoPE (rope_base="
                    f"{self.rope_embed.base}, head dim {self.rope_embed.head_dim}): got "
                    f"{given.flatten()[:4].tolist()}..., expected {computed[:4].tolist()}...")
        return own


def build_backbone(config: DinoTxtConfig) -> _ViTBackbone:
    """The backbone named by `config.backbone`."""
    if config.backbone == "dinov2":
        return DinoV2Backbone(config)
    if config.backbone == "dinov3":
        return DinoV3Backbone(config)
    raise ValueError(f"unknown backbone {config.backbone!r}; expected 'dinov2' or 'dinov3'")
