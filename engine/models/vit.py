"""A small vision transformer with the DeiT-Tiny shape (patch 16, dim 192, depth 12, heads 3).

Module names follow timm/DeiT (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``) so the released
DeiT-Tiny checkpoint loads strictly. Its linear layers see 3-D inputs (B, L, F), L = 1 + (R/16)².
Inputs of another resolution than 224 work: the position embedding is interpolated (bicubic).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneEntry, Weights, register
from .stages import Stage

DEIT_TINY_URL = "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"


class PatchEmbed(nn.Module):
    """(B, 3, R, R) -> (B, (R/p)², dim) with a stride-p conv."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self attention; (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, dim = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, L, dim/heads)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier on the class token; stages: embed, blocks.0 … blocks.N-1, head."""

    head_path = "head"

    def __init__(self, num_classes: int = 1000, resolution: int = 224, patch: int = 16, dim: int = 192,
                 depth: int = 12, heads: int = 3):
        super().__init__()
        self.resolution = resolution
        self.patch = patch
        self.patch_embed = PatchEmbed(patch, dim)
        grid = resolution // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _position_embedding(self, patches: int) -> torch.Tensor:
        """(1, 1 + patches, dim): the stored table, bicubically resized when the grid differs."""
        if patches + 1 == self.pos_embed.shape[1]:
            return self.pos_embed
        cls, grid_table = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        old, new = int(math.isqrt(grid_table.shape[1])), int(math.isqrt(patches))
        table = grid_table.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(new, new), mode="bicubic", align_corners=False)
        return torch.cat([cls, table.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)

    def embed(self, x):
        """(B, 3, R, R) -> (B, 1 + (R/16)², dim): patches, class token, position embedding."""
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self._position_embedding(tokens.shape[1])

    def classify(self, x):
        """(B, L, dim) -> (B, classes): final norm, class token, head."""
        return self.head(self.norm(x)[:, 0])

    def forward(self, x):
        return self.classify(self.blocks(self.embed(x)))

    def stages(self):
        out = [("embed", Stage(self, [self.embed], covers=["patch_embed", "cls_token", "pos_embed"]))]
        out += [(f"blocks.{i}", Stage(self, [f"blocks.{i}"])) for i in range(len(self.blocks))]
        out.append(("head", Stage(self, [self.classify], covers=["norm", "head"])))
        return out


register(BackboneEntry(
    name="vit-tiny", family="vit", builder=lambda _folder: VisionTransformer(num_classes=1000), resolution=224,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, num_params=5_717_416, linear_input="3-D",
    description="ViT with the DeiT-Tiny shape (patch 16, dim 192, depth 12, heads 3)",
    weights=Weights(url=DEIT_TINY_URL, file_names=(DEIT_TINY_URL.rsplit("/", 1)[1], "vit-tiny.pth"),
                    hash_prefix="a1311bcf", meta={"release": "DeiT-Tiny (facebookresearch/deit)", "top1": 72.2})))
