"""Test oracle: the official DINO.txt vision head, text tower and model encode paths, transcribed.

Transcribed from the official code (module and parameter names kept, so official state dicts load into these
classes and state dicts exported from them have the official layout), reduced to the single-tensor code path
without xFormers and without the unused options:

- facebookresearch/dinov2, Apache License 2.0, Copyright (c) Meta Platforms, Inc. and affiliates:
  dinov2/hub/dinotxt.py, dinov2/hub/text/{dinotxt_model, vision_tower, text_tower, text_transformer,
  dinov2_wrapper}.py, dinov2/layers/{attention, block, layer_scale, mlp, swiglu_ffn, drop_path}.py
- facebookresearch/dinov3, DINOv3 License Agreement, Copyright (c) Meta Platforms, Inc. and affiliates:
  dinov3/hub/dinotxt.py, dinov3/eval/text/{dinotxt_model, vision_tower, text_tower, text_transformer}.py,
  dinov3/layers/{attention, block, ffn_layers}.py

Release differences kept here: the v2 vision head names its block list `block_list`, v3 `blocks`; the v2 head
block is dinov2's `Block` (explicit softmax attention; batch-subset drop-path above 0.1, per-sample DropPath
below), the v3 one is dinov3's `SelfAttentionBlock` (SDPA; batch-subset drop-path for any rate); the v3 vision
tower also returns the head and backbone patch tokens. The backbone (a DINOv2 / DINOv3 ViT) is passed in:
tests use the transcribed backbones of tests/official/dinov2_ref.py and dinov3_ref.py.
"""
from __future__ import annotations

import math
import types
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------ layers


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 bias=True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class SwiGLUFFNAligned(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 bias=True, align_to=8):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        d = int(hidden_features * 2 / 3)
        swiglu_hidden_features = d + (-d % align_to)
        self.w1 = nn.Linear(in_features, swiglu_hidden_features, bias=bias)
        self.w2 = nn.Linear(in_features, swiglu_hidden_features, bias=bias)
        self.w3 = nn.Linear(swiglu_hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.w1(x)
        x2 = self.w2(x)
        hidden = F.silu(x1) * x2
        return self.w3(hidden)


class Attention(nn.Module):
    """dinov2/layers/attention.py: explicit softmax attention."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class SelfAttention(nn.Module):
    """dinov3/layers/attention.py SelfAttention without RoPE (the head passes none): SDPA."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = torch.unbind(qkv, 2)
        q, k, v = [t.transpose(1, 2) for t in [q, k, v]]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape([B, N, C])
        return self.proj_drop(self.proj(x))


def drop_add_residual_stochastic_depth(x: Tensor, residual_func: Callable[[Tensor], Tensor],
                                       sample_drop_ratio: float = 0.0) -> Tensor:
    b, n, d = x.shape
    sample_subset_size = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = (torch.randperm(b, device=x.device))[:sample_subset_size]
    x_subset = x[brange]
    residual = residual_func(x_subset)
    x_flat = x.flatten(1)
    residual = residual.flatten(1)
    residual_scale_factor = b / sample_subset_size
    x_plus_residual = torch.index_add(x_flat, 0, brange, residual.to(dtype=x.dtype), alpha=residual_scale_factor)
    return x_plus_residual.view_as(x)


class Block(nn.Module):
    """dinov2/layers/block.py Block (NestedTensorBlock on a plain tensor)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_bias=True, ffn_bias=True, drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 attn_class=Attention, ffn_layer=Mlp):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = ffn_layer(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop,
                             bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tensor) -> Tensor:
        def attn_residual_func(x: Tensor) -> Tensor:
            return self.ls1(self.attn(self.norm1(x)))

        def ffn_residual_func(x: Tensor) -> Tensor:
            return self.ls2(self.mlp(self.norm2(x)))

        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, residual_func=attn_residual_func,
                                                   sample_drop_ratio=self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, residual_func=ffn_residual_func,
                                                   sample_drop_ratio=self.sample_drop_ratio)
        elif self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(attn_residual_func(x))
            x = x + self.drop_path1(ffn_residual_func(x))
        else:
            x = x + attn_residual_func(x)
            x = x + ffn_residual_func(x)
        return x


class SelfAttentionBlock(nn.Module):
    """dinov3/layers/block.py SelfAttentionBlock (its reference single-tensor `_forward`, no RoPE)."""

    def __init__(self, dim, num_heads, ffn_ratio=4.0, qkv_bias=False, proj_bias=True, ffn_bias=True, drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 attn_class=SelfAttention, ffn_layer=Mlp):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * ffn_ratio)
        self.mlp = ffn_layer(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop,
                             bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tensor) -> Tensor:
        b, _, _ = x.shape
        sample_subset_size = max(int(b * (1 - self.sample_drop_ratio)), 1)
        residual_scale_factor = b / sample_subset_size
        if self.training and self.sample_drop_ratio > 0.0:
            indices_1 = (torch.randperm(b, device=x.device))[:sample_subset_size]
            residual_1 = self.attn(self.norm1(x[indices_1]))
            x_attn = torch.index_add(x, dim=0, source=self.ls1(residual_1).to(x.dtype), index=indices_1,
                                     alpha=residual_scale_factor)
            indices_2 = (torch.randperm(b, device=x.device))[:sample_subset_size]
            residual_2 = self.mlp(self.norm2(x_attn[indices_2]))
            x_ffn = torch.index_add(x_attn, dim=0, source=self.ls2(residual_2).to(x_attn.dtype), index=indices_2,
                                    alpha=residual_scale_factor)
        else:
            x_attn = x + self.ls1(self.attn(self.norm1(x)))
            x_ffn = x_attn + self.ls2(self.mlp(self.norm2(x_attn)))
        return x_ffn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self, init_attn_std=None, init_proj_std=None, factor=1.0):
        init_attn_std = init_attn_std or (self.dim ** -0.5)
        init_proj_std = init_proj_std or init_attn_std * factor
        nn.init.normal_(self.qkv.weight, std=init_attn_std)
        nn.init.normal_(self.proj.weight, std=init_proj_std)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, is_causal: bool = True) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = torch.unbind(qkv, 2)
        q, k, v = [t.transpose(1, 2) for t in [q, k, v]]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.attn_drop if self.training else 0, is_causal=is_causal)
        x = x.transpose(1, 2).contiguous().view(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x


class CausalAttentionBlock(nn.Module):
    """dinov2 CausalAttentionBlock / dinov3 CausalSelfAttentionBlock (identical)."""

    def __init__(self, dim, num_heads, ffn_ratio=4.0, ls_init_value=None, is_causal=True, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, dropout_prob=0.0):
        super().__init__()
        self.dim = dim
        self.is_causal = is_causal
        self.ls1 = LayerScale(dim, init_values=ls_init_value) if ls_init_value else nn.Identity()
        self.attention_norm = norm_layer(dim)
        self.attention = CausalSelfAttention(dim, num_heads, attn_drop=dropout_prob, proj_drop=dropout_prob)
        self.ffn_norm = norm_layer(dim)
        ffn_hidden_dim = int(dim * ffn_ratio)
        self.feed_forward = Mlp(in_features=dim, hidden_features=ffn_hidden_dim, drop=dropout_prob,
                                act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values=ls_init_value) if ls_init_value else nn.Identity()

    def init_weights(self, init_attn_std=None, init_proj_std=None, init_fc_std=None, factor=1.0):
        init_attn_std = init_attn_std or (self.dim ** -0.5)
        init_proj_std = init_proj_std or init_attn_std * factor
        init_fc_std = init_fc_std or (2 * self.dim) ** -0.5
        self.attention.init_weights(init_attn_std, init_proj_std)
        self.attention_norm.reset_parameters()
        nn.init.normal_(self.feed_forward.fc1.weight, std=init_fc_std)
        nn.init.normal_(self.feed_forward.fc2.weight, std=init_proj_std)
        self.ffn_norm.reset_parameters()

    def forward(self, x: Tensor):
        x_attn = x + self.ls1(self.attention(self.attention_norm(x), self.is_causal))
        x_ffn = x_attn + self.ls2(self.feed_forward(self.ffn_norm(x_attn)))
        return x_ffn


def init_weights_vit_timm(module: nn.Module, name: str = ""):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        module.reset_parameters()
    if isinstance(module, LayerScale):
        module.reset_parameters()


def named_apply(fn, module: nn.Module, name="", depth_first=True, include_root=False) -> nn.Module:
    if not depth_first and include_root:
        fn(module=module, name=name)
    for child_name, child_module in module.named_children():
        child_name = ".".join((name, child_name)) if name else child_name
        named_apply(fn=fn, module=child_module, name=child_name, depth_first=depth_first, include_root=True)
    if depth_first and include_root:
        fn(module=module, name=name)
    return module


# ------------------------------------------------------------------------------------------ vision tower


class VisionHead(nn.Module):
    def __init__(self, input_dim, embed_dim, num_heads, num_blocks, blocks_drop_path, use_class_token,
                 use_patch_tokens, use_linear_projection, release="v2"):
        super().__init__()
        self.release = release
        block_list = [nn.Identity()]
        self.ln_final = nn.Identity()
        if num_blocks > 0:
            block_class = Block if release == "v2" else SelfAttentionBlock
            ffn = partial(SwiGLUFFNAligned, align_to=64)
            block_list = [block_class(input_dim, num_heads, ffn_layer=ffn, init_values=1e-5,
                                      drop_path=blocks_drop_path) for _ in range(num_blocks)]
            self.ln_final = nn.LayerNorm(input_dim)
        # The one naming difference between the releases.
        if release == "v2":
            self.block_list = nn.ModuleList(block_list)
        else:
            self.blocks = nn.ModuleList(block_list)
        self.num_blocks = num_blocks
        multiplier = 2 if use_class_token and use_patch_tokens else 1
        self.linear_projection = nn.Identity()
        if multiplier * input_dim != embed_dim or use_linear_projection:
            assert embed_dim % multiplier == 0
            self.linear_projection = nn.Linear(input_dim, embed_dim // multiplier, bias=False)

    @property
    def block_modules(self) -> nn.ModuleList:
        return self.block_list if self.release == "v2" else self.blocks

    def init_weights(self):
        if self.num_blocks > 0:
            for block in self.block_modules:
                named_apply(init_weights_vit_timm, block)
            self.ln_final.reset_parameters()
        if isinstance(self.linear_projection, nn.Linear):
            nn.init.normal_(self.linear_projection.weight, std=self.linear_projection.in_features ** -0.5)

    def forward(self, image_tokens: Tensor) -> Tensor:
        for block in self.block_modules:
            image_tokens = block(image_tokens)
        image_tokens = self.ln_final(image_tokens)
        return self.linear_projection(image_tokens)


def _get_intermediate_layers_not_chunked(self, x, n=1):
    """dinov2 DinoVisionTransformer._get_intermediate_layers_not_chunked (as a function of the model, since
    tests/official/dinov2_ref.py leaves the get_intermediate_layers family out)."""
    x = self.prepare_tokens_with_masks(x)
    # If n is an int, take the n last blocks. If it's a list, take them
    output, total_block_len = [], len(self.blocks)
    blocks_to_take = range(total_block_len - n, total_block_len) if isinstance(n, int) else n
    for i, blk in enumerate(self.blocks):
        x = blk(x)
        if i in blocks_to_take:
            output.append(x)
    assert len(output) == len(blocks_to_take), f"only {len(output)} / {len(blocks_to_take)} blocks found"
    return output


class DINOv2Wrapper(nn.Module):
    """dinov2/hub/text/dinov2_wrapper.py: exposes the register tokens of a DINOv2 DinoVisionTransformer."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.embed_dim = model.embed_dim
        self.num_heads = model.num_heads
        self.num_register_tokens = model.num_register_tokens

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                return_register_tokens=False, norm=True):
        # The hub backbone is built with block_chunks=0, so only the not-chunked path is taken.
        assert not self.model.chunked_blocks
        outputs = _get_intermediate_layers_not_chunked(self.model, x, n)
        if norm:
            outputs = [self.model.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        register_tokens = [out[:, 1: 1 + self.model.num_register_tokens] for out in outputs]
        outputs = [out[:, 1 + self.model.num_register_tokens:] for out in outputs]
        if reshape:
            B, _, h, w = x.shape
            outputs = [out.reshape(B, h // self.model.patch_size, w // self.model.patch_size, -1)
                       .permute(0, 3, 1, 2).contiguous() for out in outputs]
        if not return_class_token and not return_register_tokens:
            return tuple(outputs)
        if return_class_token and not return_register_tokens:
            return tuple(zip(outputs, class_tokens))
        if not return_class_token and return_register_tokens:
            return tuple(zip(outputs, register_tokens))
        return tuple(zip(outputs, class_tokens, register_tokens))


def _v3_get_intermediate_layers_not_chunked(self, x: Tensor, n: int = 1):
    """dinov3 DinoVisionTransformer._get_intermediate_layers_not_chunked (bound onto the tests/official/
    dinov3_ref.py model, which leaves the get_intermediate_layers family out)."""
    x, (H, W) = self.prepare_tokens_with_masks(x)
    # If n is an int, take the n last blocks. If it's a list, take them
    output, total_block_len = [], len(self.blocks)
    blocks_to_take = range(total_block_len - n, total_block_len) if isinstance(n, int) else n
    for i, blk in enumerate(self.blocks):
        if self.rope_embed is not None:
            rope_sincos = self.rope_embed(H=H, W=W)
        else:
            rope_sincos = None
        x = blk(x, rope_sincos)
        if i in blocks_to_take:
            output.append(x)
    assert len(output) == len(blocks_to_take), f"only {len(output)} / {len(blocks_to_take)} blocks found"
    return output


def _v3_get_intermediate_layers(self, x: Tensor, *, n: int = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True):
    """dinov3 DinoVisionTransformer.get_intermediate_layers (tied cls/patch norm, as in the ViT-L)."""
    outputs = _v3_get_intermediate_layers_not_chunked(self, x, n)
    if norm:
        outputs = [self.norm(out) for out in outputs]
    class_tokens = [out[:, 0] for out in outputs]
    extra_tokens = [out[:, 1: self.n_storage_tokens + 1] for out in outputs]
    outputs = [out[:, self.n_storage_tokens + 1:] for out in outputs]
    if reshape:
        B, _, h, w = x.shape
        outputs = [out.reshape(B, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                   for out in outputs]
    if not return_class_token and not return_extra_tokens:
        return tuple(outputs)
    elif return_class_token and not return_extra_tokens:
        return tuple(zip(outputs, class_tokens))
    elif not return_class_token and return_extra_tokens:
        return tuple(zip(outputs, extra_tokens))
    return tuple(zip(outputs, class_tokens, extra_tokens))


class VisionTower(nn.Module):
    def __init__(self, backbone, freeze_backbone, embed_dim, num_head_blocks, head_blocks_block_drop_path,
                 use_class_token, use_patch_tokens, patch_token_layer, patch_tokens_pooler_type,
                 use_linear_projection, release="v2"):
        super().__init__()
        self.release = release
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.use_class_token = use_class_token
        self.use_patch_tokens = use_patch_tokens
        self.patch_token_layer = patch_token_layer
        self.patch_tokens_pooler_type = patch_tokens_pooler_type
        self.num_register_tokens = 0
        if hasattr(self.backbone, "num_register_tokens"):
            self.num_register_tokens = self.backbone.num_register_tokens
        elif hasattr(self.backbone, "n_storage_tokens"):
            self.num_register_tokens = self.backbone.n_storage_tokens
        self.head = VisionHead(self.backbone.embed_dim, embed_dim, self.backbone.num_heads, num_head_blocks,
                               head_blocks_block_drop_path, use_class_token, use_patch_tokens,
                               use_linear_projection, release=release)

    def init_weights(self):
        self.head.init_weights()

    def get_backbone_features(self, images: Tensor):
        if self.release == "v2":
            tokens = self.backbone.get_intermediate_layers(images, n=self.patch_token_layer,
                                                           return_class_token=True, return_register_tokens=True)
        else:
            tokens = self.backbone.get_intermediate_layers(images, n=self.patch_token_layer,
                                                           return_class_token=True, return_extra_tokens=True)
        class_token = tokens[-1][1]
        patch_tokens = tokens[0][0]
        register_tokens = tokens[0][2]
        return class_token, patch_tokens, register_tokens

    def get_class_and_patch_tokens(self, images: Tensor):
        class_token, patch_tokens, register_tokens = self.get_backbone_features(images)
        image_tokens = self.head(torch.cat([class_token.unsqueeze(1), register_tokens, patch_tokens], dim=1))
        if self.release == "v2":
            return image_tokens[:, 0], image_tokens[:, self.num_register_tokens + 1:]
        return image_tokens[:, 0], image_tokens[:, self.num_register_tokens + 1:], patch_tokens

    def forward(self, images: Tensor):
        class_token, patch_tokens, *backbone_patch_tokens = self.get_class_and_patch_tokens(images)
        features = []
        if self.use_class_token:
            features.append(class_token)
        if self.use_patch_tokens:
            if self.patch_tokens_pooler_type == "mean":
                features.append(torch.mean(patch_tokens, dim=1))
            elif self.patch_tokens_pooler_type == "max":
                features.append(torch.max(patch_tokens, dim=1).values)
            else:
                raise ValueError(f"Unknown patch tokens pooler type: {self.patch_tokens_pooler_type}")
        if self.release == "v2":
            return torch.cat(features, dim=-1)
        return torch.cat(features, dim=-1), patch_tokens, backbone_patch_tokens[0]


# -------------------------------------------------------------------------------------------- text tower


class TextTransformer(nn.Module):
    def __init__(self, context_length, vocab_size, dim, num_heads, num_layers, ffn_ratio, is_causal,
                 ls_init_value=None, act_layer=nn.GELU, norm_layer=nn.LayerNorm, dropout_prob=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = dim
        self.num_heads = num_heads
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, dim))
        self.dropout = nn.Dropout(dropout_prob)
        self.num_layers = num_layers
        self.blocks = nn.ModuleList([
            CausalAttentionBlock(dim=dim, num_heads=num_heads, ffn_ratio=ffn_ratio, ls_init_value=ls_init_value,
                                 is_causal=is_causal, act_layer=act_layer, norm_layer=norm_layer,
                                 dropout_prob=dropout_prob)
            for _ in range(num_layers)])
        self.ln_final = norm_layer(dim)

    def init_weights(self):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_attn_std = self.embed_dim ** -0.5
        init_proj_std = (self.embed_dim ** -0.5) * ((2 * self.num_layers) ** -0.5)
        init_fc_std = (2 * self.embed_dim) ** -0.5
        for block in self.blocks:
            block.init_weights(init_attn_std, init_proj_std, init_fc_std)
        self.ln_final.reset_parameters()

    def forward(self, token_indices: Tensor) -> Tensor:
        _, N = token_indices.size()
        x = self.token_embedding(token_indices) + self.positional_embedding[:N]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        return x


class TextHead(nn.Module):
    def __init__(self, input_dim, embed_dim, num_heads, num_blocks, block_drop_prob, is_causal,
                 use_linear_projection, release="v2"):
        super().__init__()
        self.release = release
        block_list = [nn.Identity()]
        self.ln_final = nn.Identity()
        if num_blocks > 0:
            block_list = [CausalAttentionBlock(dim=input_dim, num_heads=num_heads, is_causal=is_causal,
                                               dropout_prob=block_drop_prob) for _ in range(num_blocks)]
            self.ln_final = nn.LayerNorm(input_dim)
        if release == "v2":
            self.block_list = nn.ModuleList(block_list)
        else:
            self.blocks = nn.ModuleList(block_list)
        self.num_blocks = num_blocks
        self.linear_projection = nn.Identity()
        if input_dim != embed_dim or use_linear_projection:
            self.linear_projection = nn.Linear(input_dim, embed_dim, bias=False)

    def init_weights(self):
        if isinstance(self.linear_projection, nn.Linear):
            nn.init.normal_(self.linear_projection.weight, std=self.linear_projection.in_features ** -0.5)

    def forward(self, text_tokens: Tensor) -> Tensor:
        for block in (self.block_list if self.release == "v2" else self.blocks):
            text_tokens = block(text_tokens)
        text_tokens = self.ln_final(text_tokens)
        return self.linear_projection(text_tokens)


class TextTower(nn.Module):
    def __init__(self, backbone, freeze_backbone, embed_dim, num_head_blocks, head_blocks_is_causal,
                 head_blocks_block_drop_prob, tokens_pooler_type, use_linear_projection, release="v2"):
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.head = TextHead(backbone.embed_dim, embed_dim, backbone.num_heads, num_head_blocks,
                             head_blocks_block_drop_prob, head_blocks_is_causal, use_linear_projection,
                             release=release)
        self.tokens_pooler_type = tokens_pooler_type

    def init_weights(self):
        self.backbone.init_weights()
        self.head.init_weights()

    def forward(self, token_indices: Tensor) -> Tensor:
        text_tokens = self.backbone(token_indices)
        text_tokens = self.head(text_tokens)
        if self.tokens_pooler_type == "first":
            features = text_tokens[:, 0]
        elif self.tokens_pooler_type == "last":
            features = text_tokens[:, -1]
        elif self.tokens_pooler_type == "argmax":
            features = text_tokens[torch.arange(text_tokens.shape[0]), token_indices.argmax(dim=-1)]
        else:
            raise ValueError(f"Unknown text tokens pooler type: {self.tokens_pooler_type}")
        return features


# ------------------------------------------------------------------------------------------------ model


class DinoTxt(nn.Module):
    """dinov2 DinoTxt / dinov3 DINOTxt with the hub configuration (dinov2/hub/dinotxt.py,
    dinov3/hub/dinotxt.py): class + mean-patch image features, 2 head blocks, argmax text pooling,
    a bias-free text projection, logit_scale of shape [1]."""

    def __init__(self, vision_backbone: nn.Module, text_backbone: nn.Module, embed_dim: int, release: str = "v2",
                 num_head_blocks: int = 2, head_drop_path: float = 0.3):
        super().__init__()
        self.release = release
        self.visual_model = VisionTower(vision_backbone, True, embed_dim, num_head_blocks, head_drop_path, True,
                                        True, 1, "mean", False, release=release)
        self.text_model = TextTower(text_backbone, False, embed_dim, 0, False, 0.0, "argmax", True,
                                    release=release)
        self.logit_scale = nn.Parameter(torch.ones(1) * math.log(1 / 0.07))

    def init_weights(self):
        self.visual_model.init_weights()
        self.text_model.init_weights()

    def get_visual_class_and_patch_tokens(self, image: Tensor):
        return self.visual_model.get_class_and_patch_tokens(image)

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        features = self.visual_model(image)
        if self.release == "v3":
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        features = self.text_model(text)
        return F.normalize(features, dim=-1) if normalize else features


def build_dinotxt(vision_backbone: nn.Module, *, release: str, embed_dim: int, context_length: int,
                  vocab_size: int, text_dim: int, text_heads: int, text_layers: int) -> DinoTxt:
    """The hub builders with the sizes as arguments. `vision_backbone`: an official-layout DINOv2
    DinoVisionTransformer (wrapped here in DINOv2Wrapper, as the v2 hub does) or DINOv3 one (used as is)."""
    if release == "v2":
        vision_backbone = DINOv2Wrapper(vision_backbone)
    elif not hasattr(vision_backbone, "get_intermediate_layers"):
        # Bound on the instance, not wrapped: the v3 model holds the backbone itself (visual_model.backbone.*).
        vision_backbone.get_intermediate_layers = types.MethodType(_v3_get_intermediate_layers, vision_backbone)
    text_backbone = TextTransformer(context_length=context_length, vocab_size=vocab_size, dim=text_dim,
                                    num_heads=text_heads, num_layers=text_layers, ffn_ratio=4, is_causal=True,
                                    ls_init_value=None, dropout_prob=0.0)
    model = DinoTxt(vision_backbone, text_backbone, embed_dim, release=release)
    model.init_weights()
    return model.eval()


def official_files(model: DinoTxt) -> dict[str, dict[str, Tensor]]:
    """The release files of an oracle model: v2 {"backbone", "vision_head", "text_encoder"} (as the v2 hub
    loads them: visual_model.head / text_model state dicts), v3 {"backbone", "weights"} (the DINOTxt state dict
    without the backbone, as the v3 hub file)."""
    backbone = model.visual_model.backbone
    if model.release == "v2":
        return {"backbone": dict(backbone.model.state_dict()),
                "vision_head": dict(model.visual_model.head.state_dict()),
                "text_encoder": dict(model.text_model.state_dict())}
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("visual_model.backbone.")}
    return {"backbone": dict(backbone.state_dict()), "weights": weights}
