"""SegFormer-style all-MLP decoders (official `SegHead` = `norm`, `WeightedSegHead` = `weighted`).

Each stage feature is projected to `embedding_dim` by a per-pixel Linear (`linear_c{i}.proj`),
upsampled (bilinear, `align_corners=False`) to the first stage's grid, and fused:
- `norm`: concatenated, 1x1 conv + BN + ReLU (`linear_fuse`), dropout, 1x1 classifier;
- `weighted`: each level gets a 1x1 conv + BN + ReLU (`weight_c{i}`), a 1x1 conv over their
  concatenation predicts 4 per-pixel level weights (softmax), the levels are summed with them,
  dropout, 1x1 classifier. Its `linear_fuse` exists in the official model but is unused.
Output: logits at the first stage's resolution, `[B, classes, H1, W1]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.models.layers import init_transformer_weights, run_checkpointed


class LinearEmbed(nn.Module):
    """`[B, C, H, W]` -> `[B, embed_dim, H, W]` with a per-pixel Linear (`proj`)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, H, W)


class ConvBNReLU(nn.Module):
    """1x1 conv (no bias) + BatchNorm (eps 1e-3, momentum 0.03, as the official ConvModule) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """`head_type='norm'`: concatenate the four projected levels and fuse with a 1x1 conv."""

    def __init__(
        self, num_classes: int, in_channels: tuple[int, ...], embedding_dim: int = 768, dropout: float = 0.1
    ):
        super().__init__()
        for i in (4, 3, 2, 1):  # the official registration order (state-dict order)
            self.add_module(f"linear_c{i}", LinearEmbed(in_channels[i - 1], embedding_dim))
        self.linear_fuse = ConvBNReLU(4 * embedding_dim, embedding_dim)
        self.linear_pred = nn.Conv2d(embedding_dim, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.checkpointing = False  # set by DDESeg.set_activation_checkpointing
        self.apply(init_transformer_weights)

    def embed_levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Four stage features -> four `[B, embedding_dim, H1, W1]` maps, deepest first."""
        size = features[0].shape[2:]
        levels = []
        for i in (4, 3, 2, 1):
            x = getattr(self, f"linear_c{i}")(features[i - 1])
            if i > 1:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(x)
        return levels

    def _fuse_conv(self, *features: torch.Tensor) -> torch.Tensor:
        return self.linear_fuse.conv(torch.cat(self.embed_levels(list(features)), dim=1))

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_pred(self.dropout(x))

    def _activate_and_classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._classify(self.linear_fuse.act(x))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # Checkpointing leaves the train-mode BatchNorm outside the segments: a recompute would
        # update its running statistics a second time. The 4-level concatenation (the largest
        # activation) and the ReLU/dropout/classifier tail are rebuilt in the backward pass.
        fused = run_checkpointed(self._fuse_conv, *features, enabled=self.checkpointing)
        normed = self.linear_fuse.bn(fused)
        return run_checkpointed(self._activate_and_classify, normed, enabled=self.checkpointing)


class WeightedSegFormerHead(SegFormerHead):
    """`head_type='weighted'`: per-pixel softmax weights over the four levels."""

    def __init__(
        self, num_classes: int, in_channels: tuple[int, ...], embedding_dim: int = 768, dropout: float = 0.1
    ):
        nn.Module.__init__(self)
        for i in (4, 3, 2, 1):
            self.add_module(f"linear_c{i}", LinearEmbed(in_channels[i - 1], embedding_dim))
        for i in (4, 3, 2, 1):
            self.add_module(f"weight_c{i}", ConvBNReLU(embedding_dim, embedding_dim))
        self.linear_fuse = ConvBNReLU(4 * embedding_dim, embedding_dim)  # unused (official layout)
        self.weight_levels = nn.Conv2d(4 * embedding_dim, 4, kernel_size=1)
        self.linear_pred = nn.Conv2d(embedding_dim, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.checkpointing = False
        self.apply(init_transformer_weights)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = self.embed_levels(features)  # c4, c3, c2, c1
        gates = [getattr(self, f"weight_c{i}")(x) for i, x in zip((4, 3, 2, 1), levels, strict=True)]
        weights = self.weight_levels(torch.cat(gates, dim=1)).softmax(dim=1)  # [B, 4, H1, W1]
        fused = sum(x * weights[:, j : j + 1] for j, x in enumerate(levels))
        # Its BatchNorms sit inside the level gates; only the classifier tail is checkpointed.
        return run_checkpointed(self._classify, fused, enabled=self.checkpointing)


HEADS = {"norm": SegFormerHead, "weighted": WeightedSegFormerHead}
