"""HTS-AT: the hierarchical token-semantic audio transformer (Chen et al., ICASSP 2022).

A Swin transformer over a log-mel "image": the `[frames, mel]` log-mel is resized to
`[4 * spec_size, spec_size / 4]` and folded into a `spec_size x spec_size` picture (four time
chunks stacked along frequency), cut into 4x4 patches, and run through four Swin stages with
shifted windows and patch merging. The token-semantic head (`tscam_conv`) maps the last stage to
per-frame class activations; DDESeg only uses `latent` (the mean of the normed last-stage
tokens, `[B, 768]`).

Parameter names match the official `HTSAT_Swin_Transformer`, so HTS-AT AudioSet checkpoints and
official DDESeg checkpoints load as they are (including `attn_mask` buffers of shifted blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.models.frontend import LogMelFilterBank, Spectrogram, spec_augment
from ddeseg.models.layers import DropPath, Mlp, init_transformer_weights

MASKED = -100.0  # attention logit between tokens that a cyclic shift made neighbours


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` -> `[B * H/window * W/window, window * window, C]`."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """`[B * nW, window * window, C]` -> `[B, H, W, C]`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the `(2w-1)^2` bias table for every (query, key) pair of a window: `[w*w, w*w]`."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def shifted_window_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask `[nW, w*w, w*w]`: 0 within a region, -100 across the regions a roll glued."""
    region = torch.zeros(1, H, W, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows, cols, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # [nW, w*w]
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused_attn: bool = False):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B * nW, N, C]`, mask `[nW, N, N]` or None -> `[B * nW, N, C]`."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1)  # [heads, N, N]
        if mask is not None:
            nW = mask.shape[0]
            bias = (bias[None] + mask[:, None]).repeat(B_ // nW, 1, 1, 1)  # [B * nW, heads, N, N]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention block; windows as large as the grid when the grid is small."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int = 8, shift: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, fused_attn: bool = False):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, attn_drop, drop, fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(*resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), mask=self.attn_mask)
        x = window_reverse(x, self.window, H, W)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (`[B, H*W, C]` -> `[B, H*W/4, 4C]`), normed, projected to 2C."""

    def __init__(self, resolution: tuple[int, int], dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, _, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C)
        # channel order (row, col) offsets: (0,0), (1,0), (0,1), (1,1), as Swin
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then an optional patch merging."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: list[float],
                 downsample: bool, fused_attn: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, qkv_bias,
                      drop, attn_drop, drop_path[i], fused_attn)
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """Non-overlapping patches of the folded spectrogram: `[B, 1, S, S]` -> `[B, (S/4)^2, dim]`."""

    def __init__(self, img_size: int, patch_size: int, patch_stride: tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.grid_size = (img_size // patch_stride[0], img_size // patch_stride[1])
        padding = ((patch_size - patch_stride[0]) // 2, (patch_size - patch_stride[1]) // 2)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class HTSAT(nn.Module):
    """HTS-AT with its front end inside (`spectrogram_extractor`, `logmel_extractor`, `bn0`).

    Input (any of): waveform `[B, samples]`; log-mel `[B, frames, mel_bins]` or
    `[B, 1, frames, mel_bins]` (the front end's output, before `bn0`). At most
    `4 * spec_size` frames (about 12 s at the default rate); shorter inputs are stretched
    (bicubic) to that length, as the official model does.

    In training mode it applies SpecAugment after `bn0` and stochastic depth, like the official
    code; DDESeg keeps it in eval mode unless its audio mode is `official`.
    """

    def __init__(
        self,
        spectrogram_extractor: Spectrogram,
        logmel_extractor: LogMelFilterBank,
        mel_bins: int = 64,
        spec_size: int = 256,
        patch_size: int = 4,
        patch_stride: tuple[int, int] = (4, 4),
        in_chans: int = 1,
        num_classes: int = 527,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (4, 8, 16, 32),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        enable_tscam: bool = True,
        fused_attn: bool = False,
    ):
        super().__init__()
        if spec_size % mel_bins:
            raise ValueError(f"spec_size {spec_size} must be a multiple of mel_bins {mel_bins}")
        self.spec_size = spec_size
        self.freq_ratio = spec_size // mel_bins
        self.patch_stride = tuple(patch_stride)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.enable_tscam = enable_tscam
        self.spec_augment = True  # in training mode, as the official HTS-AT (DDESeg: model.audio.spec_augment)

        self.spectrogram_extractor = spectrogram_extractor
        self.logmel_extractor = logmel_extractor
        self.bn0 = nn.BatchNorm2d(mel_bins)
        self.patch_embed = PatchEmbed(spec_size, patch_size, self.patch_stride, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)

        grid = self.patch_embed.grid_size
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    dim=embed_dim * 2**i,
                    resolution=(grid[0] // 2**i, grid[1] // 2**i),
                    depth=depth,
                    num_heads=num_heads[i],
                    window=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depth],
                    downsample=i < len(depths) - 1,
                    fused_attn=fused_attn,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        if enable_tscam:
            freq_kernel = spec_size // 2 ** (len(depths) - 1) // self.patch_stride[0] // self.freq_ratio
            self.tscam_conv = nn.Conv2d(self.num_features, num_classes, kernel_size=(freq_kernel, 3), padding=(0, 1))
            self.head = nn.Linear(num_classes, num_classes)
        else:
            self.head = nn.Linear(self.num_features, num_classes)
        self.apply(lambda m: init_transformer_weights(m, convs=False))

    # ---- input
    def logmel(self, audio: torch.Tensor) -> torch.Tensor:
        """Waveform or log-mel (see the class docstring) -> log-mel `[B, 1, frames, mel_bins]`."""
        if audio.ndim == 2:
            return self.logmel_extractor(self.spectrogram_extractor(audio))
        if audio.ndim == 3:
            return audio.unsqueeze(1)
        if audio.ndim == 4 and audio.shape[1] == 1:
            return audio
        raise ValueError(
            f"audio must be a waveform [B, samples] or a log-mel [B, frames, mel] / [B, 1, frames, mel], "
            f"got shape {tuple(audio.shape)}"
        )

    def fold_to_image(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 1, frames, mel]` -> `[B, 1, spec_size, spec_size]`: stretch time to
        `freq_ratio * spec_size` frames, then stack the `freq_ratio` time chunks along frequency."""
        B, C, T, M = x.shape
        target_t, target_m = self.spec_size * self.freq_ratio, self.spec_size // self.freq_ratio
        if T > target_t or M > target_m:
            raise ValueError(f"log-mel [{T} frames, {M} mel] exceeds the audio backbone's [{target_t}, {target_m}]")
        if T < target_t:
            x = F.interpolate(x, (target_t, M), mode="bicubic", align_corners=True)
        if M < target_m:
            x = F.interpolate(x, (x.shape[2], target_m), mode="bicubic", align_corners=True)
        x = x.transpose(2, 3)  # [B, C, mel, time]
        x = x.reshape(B, C, target_m, self.freq_ratio, self.spec_size).transpose(2, 3)
        return x.reshape(B, C, self.spec_size, self.spec_size)

    # ---- network
    def forward_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio -> normed last-stage tokens `[B, (spec_size/32)^2, num_features]`."""
        x = self.logmel(audio)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel bin
        if self.training and self.spec_augment:
            x = spec_augment(x)
        x = self.pos_drop(self.patch_embed(self.fold_to_image(x)))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_latent(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio -> the latent DDESeg uses: mean of the normed last-stage tokens, `[B, num_features]`."""
        return self.forward_tokens(audio).mean(dim=1)

    def forward_head(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token-semantic head: `clipwise_output` `[B, classes]` (sigmoid) and `framewise_output`
        `[B, 32 * patch_stride * cols, classes]` (sigmoid), the official HTS-AT outputs."""
        B, N, C = tokens.shape
        side = int(N**0.5)
        x = tokens.transpose(1, 2).reshape(B, C, side, side)
        if not self.enable_tscam:
            logits = self.head(tokens.mean(dim=1))
            return {"clipwise_output": torch.sigmoid(logits), "latent_output": tokens.mean(dim=1)}
        # regroup rows so each of the `rows_per_chunk` frequency rows lists all time chunks
        rows_per_chunk = side // self.freq_ratio
        x = x.reshape(B, C, self.freq_ratio, rows_per_chunk, side).transpose(2, 3)
        x = x.reshape(B, C, rows_per_chunk, -1)
        activation = self.tscam_conv(x).flatten(2)  # [B, classes, time tokens]
        repeat = 8 * self.patch_stride[1]
        framewise = torch.sigmoid(activation).transpose(1, 2).repeat_interleave(repeat, dim=1)
        return {
            "clipwise_output": torch.sigmoid(activation.mean(dim=2)),
            "framewise_output": framewise,
            "latent_output": x.flatten(2).mean(dim=2),
        }

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """Audio -> `{'latent_output', 'clipwise_output', 'framewise_output'}` as the official model."""
        return self.forward_head(self.forward_tokens(audio))
