"""The visual backbone: a Mix Transformer (MiT, SegFormer) with an audio-visual aligner per stage.

Four stages; each one embeds patches with an overlapping strided conv, projects the derived audio
semantics (`[B, k, 768]`) to the stage width (`aud_projs`), runs the aligner (dynamic
elimination, `aligner.py`), then the MiT blocks (efficient self-attention with a spatial-reduction
conv, Mix-FFN with a 3x3 depth-wise conv) and a LayerNorm. DDESeg's first patch embed is kernel 7
with **stride 2** (MiT's is stride 4), so the stage grids are H/2, H/4, H/8, H/16.

Parameter names are MiT's (`patch_embed1`, `block1.0.attn.sr`, `mlp.dwconv.dwconv`, `norm1`,
...), so MiT/SegFormer ImageNet weights load into it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.models.aligner import AudioVisualAligner
from ddeseg.models.layers import DropPath, Mlp, init_transformer_weights, run_checkpointed


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlap (`padding = kernel // 2`) + LayerNorm: `[B, C, H, W]` -> tokens, H', W'."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class EfficientSelfAttention(nn.Module):
    """Self-attention whose keys/values come from a grid shrunk by `sr_ratio` (strided conv + LN)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1, fused_attn: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(B, N, heads, C // heads).transpose(1, 2)  # [B, h, N, C/h]
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)  # [B, N/sr^2, C]
            x = self.norm(x)
        k, v = self.kv(x).reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)  # 2 x [B, h, M, C/h]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class DWConv(nn.Module):
    """3x3 depth-wise conv on tokens laid out as an `H x W` grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """`fc1 -> depth-wise 3x3 conv -> GELU -> fc2` (positional information from the conv)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: efficient self-attention and Mix-FFN, each with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, sr_ratio: int = 1, fused_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio, fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MiTAligned(nn.Module):
    """MiT backbone with audio-visual aligners (the official `FAVSBackbone`).

    `forward(image [B, 3, H, W], audio_tokens [B, k, audio_dim])` returns the four stage features,
    NCHW: `[B, C_i, H / 2^(i+1), W / 2^(i+1)]` for the default first stride 2.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (4, 4, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        depths: tuple[int, ...] = (3, 6, 40, 3),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        first_patch_stride: int = 2,
        audio_dim: int = 768,
        aligner_heads: int = 8,
        aligner_clusters: int = 5,
        gumbel_tau: float = 1.0,
        fused_attn: bool = False,
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the MiT backbone has 4 stages, got widths {in_channels}")
        self.num_stages = 4
        # Activation checkpointing (off: the plain forward); set by DDESeg.set_activation_checkpointing.
        self.checkpoint_stages = self.checkpoint_blocks = self.checkpoint_aligners = False
        previous = 3
        for i, dim in enumerate(in_channels):
            kernel, stride = (7, first_patch_stride) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(kernel, stride, previous, dim))
            previous = dim
        self.aud_projs = nn.ModuleList(Mlp(audio_dim, audio_dim * 4, dim) for dim in in_channels)
        self.av_aligners = nn.ModuleList(
            AudioVisualAligner(dim, aligner_heads, aligner_clusters, gumbel_tau) for dim in in_channels
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        for i, dim in enumerate(in_channels):
            start = sum(depths[:i])
            blocks = nn.ModuleList(
                MiTBlock(dim, num_heads[i], mlp_ratios[i], qkv_bias, drop_rate, attn_drop_rate, rates[start + j],
                         sr_ratios[i], fused_attn)
                for j in range(depths[i])
            )
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim))
        self._init_weights()

    def _init_weights(self) -> None:
        for i in range(self.num_stages):
            getattr(self, f"patch_embed{i + 1}").apply(init_transformer_weights)
            getattr(self, f"block{i + 1}").apply(init_transformer_weights)
        for projection in self.aud_projs:  # the official audio projections use Xavier
            nn.init.xavier_uniform_(projection.fc1.weight)
            nn.init.xavier_uniform_(projection.fc2.weight)

    def forward_stage(self, i: int, x: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        """Stage `i` (0-based): NCHW input (the image for stage 0) -> NCHW stage feature."""
        B = x.shape[0]
        x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
        x = run_checkpointed(self._align, i, audio_tokens, x, enabled=self.checkpoint_aligners)
        for block in getattr(self, f"block{i + 1}"):
            x = run_checkpointed(block, x, H, W, enabled=self.checkpoint_blocks)
        x = getattr(self, f"norm{i + 1}")(x)
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]

    def _align(self, i: int, audio_tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.av_aligners[i](self.aud_projs[i](audio_tokens), x)

    def forward(self, image: torch.Tensor, audio_tokens: torch.Tensor) -> list[torch.Tensor]:
        x, features = image, []
        for i in range(self.num_stages):
            x = run_checkpointed(self.forward_stage, i, x, audio_tokens, enabled=self.checkpoint_stages)
            features.append(x)
        return features
