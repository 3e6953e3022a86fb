"""One pass of a CLIP image tower that yields dense, text-aligned embeddings.

CLIP is trained to align one *global* image embedding with text; its per-location
features are not aligned as they stand. Two training-free fixes are used here:

* ViT towers — ClearCLIP (Lan et al., "ClearCLIP: Decomposing CLIP Representations
  for Dense Vision-Language Inference", ECCV 2024): in the last block, drop the
  residual connection and the feed-forward network and use query-query attention;
  the result goes through the usual ``ln_post`` and projection. MaskCLIP's ViT variant
  (value projection only, no token mixing) is the alternative; on the small demo CLIP
  it measures better (README), on web-scale CLIPs ClearCLIP is the published winner.
* ResNet towers — MaskCLIP (Zhou et al., "Extract Free Dense Labels from CLIP",
  ECCV 2022): the attention pool's value and output projections applied at every
  location, without the query-key pooling.

The same pass also returns the CLIP's own global image embedding (the class token through
the unchanged last block, or the ResNet's attention pool: what CLIP was trained to align with
text, and its best-calibrated signal of which labels an image shows) and intermediate feature
maps from several depths, which the trainable decoder (:mod:`model.segmenter`) builds on. Position embeddings are
interpolated, so any input size that is a multiple of the patch (or stride) works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DEFAULTS, DENSE_METHODS


@dataclass
class TowerOutput:
    """What one image-tower pass returns.

    Attributes:
        dense: (B, D, h, w) embeddings in CLIP's joint space (not normalised).
        features: intermediate maps, each (B, C_i, h_i, w_i), shallow to deep.
        image: (B, D) the CLIP's global image embedding (not normalised).
    """

    dense: torch.Tensor
    features: list[torch.Tensor]
    image: torch.Tensor


def _contiguous_attention(x: torch.Tensor) -> bool:
    """Whether the blocks attend with :func:`_attention`: under autocast, and when traced for another runtime
    (the module's own fast path is a fused kernel other runtimes do not have, or run slowly)."""
    return torch.is_autocast_enabled(x.device.type) or torch.jit.is_tracing()


def _attention(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """``attn`` (batch-first, no mask) of ``query`` (B, Q, C) over ``keys`` (B, K, C; None: self-attention),
    on contiguous batch-first tensors. The module's own path transposes them to sequence-first, and a linear
    layer on that view under CPU bf16 autocast broadcasts its weight to every token: ViT-B/16 at 448 px took
    13 s per image in a batch of two, against 0.4 s alone. Used under autocast and tracing only: eager
    float32 never hit this, and keeps open_clip's own blocks unchanged."""
    width, heads = query.shape[-1], attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if keys is None:
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:
        q = F.linear(query, weight[:width], None if bias is None else bias[:width])
        k, v = F.linear(keys, weight[width:], None if bias is None else bias[width:]).chunk(2, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return attn.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], width))


def _resize_grid(pos: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(g_h*g_w, C) position embeddings → (h*w, C) by bicubic interpolation."""
    if not torch.jit.is_tracing() and tuple(grid) == tuple(size):  # a traced graph resizes for any size
        return pos
    channels = pos.shape[-1]
    pos = pos.reshape(1, grid[0], grid[1], channels).permute(0, 3, 1, 2)
    pos = F.interpolate(pos.float(), size=size, mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(size[0] * size[1], channels)


class ViTDenseTower(nn.Module):
    """Dense embeddings from an open_clip ``VisionTransformer``.

    Args:
        visual: the open_clip image tower.
        method: ``clearclip`` (query-query attention in the last block) or ``maskclip``
            (the last block's value projection alone, no token mixing). Both drop the last
            block's residual and feed-forward paths.
        feature_depths: how many intermediate maps to hand to the decoder.
    """

    def __init__(self, visual: nn.Module, method: str, feature_depths: int = 3):
        super().__init__()
        self.visual = visual
        self.method = method
        blocks = len(visual.transformer.resblocks)
        # Taps spread over the depth, the last one being the input of the final block.
        self.taps = sorted({max(0, round(blocks * (k + 1) / feature_depths) - 2) for k in range(feature_depths)})
        self.stride = visual.patch_size[0]
        self.feature_dims = [visual.transformer.width] * len(self.taps)
        self.embed_dim = visual.output_dim

    def _last_block(self, x: torch.Tensor) -> torch.Tensor:
        block = self.visual.transformer.resblocks[-1]
        attn = block.attn
        y = block.ln_1(x)
        if not attn.batch_first:
            y = y.transpose(0, 1)
        batch, tokens, width = y.shape
        heads = attn.num_heads
        q, _, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if self.method == "clearclip":
            q = q.reshape(batch, tokens, heads, -1).transpose(1, 2)
            v = v.reshape(batch, tokens, heads, -1).transpose(1, 2)
            v = F.scaled_dot_product_attention(q, q, v).transpose(1, 2).reshape(batch, tokens, width)
        return block.ls_1(attn.out_proj(v))

    def _class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The last block, unchanged, for the class token alone (its query attends to every token): (B, C)."""
        block = self.visual.transformer.resblocks[-1]
        cls = x[:, :1]
        query, keys = block.ln_1(cls), block.ln_1(x)
        attended = (_attention(block.attn, query, keys) if _contiguous_attention(x)
                    else block.attn(query, keys, keys, need_weights=False)[0])
        cls = cls + block.ls_1(attended)
        return (cls + block.ls_2(block.mlp(block.ln_2(cls))))[:, 0]

    def forward(self, images: torch.Tensor) -> TowerOutput:
        """images: (B, 3, H, W), normalised, H and W multiples of the patch size."""
        v = self.visual
        b, _, height, width = images.shape
        h, w = height // self.stride, width // self.stride
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        pos = v.positional_embedding.to(x.dtype)
        pos = torch.cat([pos[:1], _resize_grid(pos[1:], v.grid_size, (h, w)).to(x.dtype)])
        x = v.ln_pre(torch.cat([cls, x], dim=1) + pos)
        if not v.transformer.resblocks[0].attn.batch_first:
            raise NotImplementedError("sequence-first transformer blocks are not supported")
        features = []
        for index, block in enumerate(v.transformer.resblocks[:-1]):
            if _contiguous_attention(x):
                x = x + block.ls_1(_attention(block.attn, block.ln_1(x)))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            else:
                x = block(x)
            if index in self.taps:
                features.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        if not features:  # a one-block tower: its only tap is the final block's input
            features.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        dense = v.ln_post(self._last_block(x)[:, 1:]) @ v.proj
        image = v.ln_post(self._class_token(x)) @ v.proj
        return TowerOutput(dense=dense.transpose(1, 2).reshape(b, -1, h, w), features=features, image=image)


class ResNetDenseTower(nn.Module):
    """Dense embeddings from an open_clip ``ModifiedResNet`` (MaskCLIP attention pool)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.stride = 32
        self.feature_dims = [visual.layer2[-1].conv3.out_channels, visual.layer3[-1].conv3.out_channels,
                             visual.layer4[-1].conv3.out_channels]
        self.embed_dim = visual.attnpool.c_proj.out_features

    def forward(self, images: torch.Tensor) -> TowerOutput:
        v = self.visual
        x = v.stem(images)
        x = v.layer1(x)
        f2 = v.layer2(x)
        f3 = v.layer3(f2)
        f4 = v.layer4(f3)
        b, c, h, w = f4.shape
        pool = v.attnpool
        grid = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
        pos = _resize_grid(pool.positional_embedding[1:], (grid, grid), (h, w)).to(f4.dtype)
        tokens = f4.flatten(2).transpose(1, 2) + pos
        dense = pool.c_proj(pool.v_proj(tokens))
        # The pool itself, with its position embeddings at this size: the mean token's query over every token.
        keys = torch.cat([f4.flatten(2).mean(2)[:, None] + pool.positional_embedding[:1].to(f4.dtype), tokens], 1)
        query = pool.q_proj(keys[:, :1]).reshape(b, 1, pool.num_heads, -1).transpose(1, 2)
        key, value = (proj(keys).reshape(b, keys.shape[1], pool.num_heads, -1).transpose(1, 2)
                      for proj in (pool.k_proj, pool.v_proj))
        image = pool.c_proj(F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, -1))
        return TowerOutput(dense=dense.transpose(1, 2).reshape(b, -1, h, w), features=[f2, f3, f4], image=image)


def _for_tower(visual: nn.Module, vit_method: str) -> nn.Module:
    """``vit_method`` on a ViT tower; a ResNet tower has no attention block to change: MaskCLIP's pool."""
    name = visual.__class__.__name__
    if name == "VisionTransformer":
        return ViTDenseTower(visual, vit_method)
    if name == "ModifiedResNet":
        return ResNetDenseTower(visual)
    raise NotImplementedError(f"no dense CLIP method for image tower {name}")


def build_clearclip(visual: nn.Module) -> nn.Module:
    """ClearCLIP: query-query attention in a ViT's last block, without its residual and feed-forward paths."""
    return _for_tower(visual, "clearclip")


def build_maskclip(visual: nn.Module) -> nn.Module:
    """MaskCLIP: a ViT's last value projection alone, or a ResNet's attention pool without its pooling."""
    return _for_tower(visual, "maskclip")


# The registry of dense methods (DENSE_METHOD): thin builders over open_clip image towers.
DENSE_TOWERS = {"clearclip": build_clearclip, "maskclip": build_maskclip}
assert tuple(DENSE_TOWERS) == DENSE_METHODS, "model.config.DENSE_METHODS names the registry's builders"


def build_dense_tower(visual: nn.Module, method: str = DEFAULTS.dense_method) -> nn.Module:
    """The dense tower of ``method`` (:data:`DENSE_TOWERS`) for an open_clip image tower."""
    if method not in DENSE_TOWERS:
        raise ValueError(f"unknown dense method {method!r}; choose one of {', '.join(DENSE_TOWERS)}")
    return DENSE_TOWERS[method](visual)
