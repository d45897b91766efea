"""Dynamic derivation: the token feature enhancer (official `TokenFeatureEnhancer`).

From the mixed-audio latent `t [B, D]` and the audio memory bank `[classes, entries, D]` it derives
k audio semantics, one per nearby sound class, in two stages:

1. **class level**: the k class means nearest to `t` (Euclidean); the edges `mean_j - t` go
   through `edge_fc_s1` (Linear + GELU) and are reweighted by `softmax(fusion_s1(edge))` taken
   over the k classes; a tanh offset `offset_s1(t + edge)` scales `t`:
   `s1_j = (1 + offset) * t`  -> `[B, k, D]`;
2. **entry level**: for each chosen class, the edges from `s1_j` to every bank entry of that class
   go through `edge_fc_s2`, are reweighted by a softmax over the entries, give offsets the same
   way, and the entry-wise results `(1 + offset) * s1_j` are summed over the entries
   -> `[B, k, D]`.

Returns both stages; DDESeg feeds the second to the visual backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from ddeseg.models.layers import init_transformer_weights


class TokenFeatureEnhancer(nn.Module):
    def __init__(self, embed_dim: int = 768, k: int = 5):
        super().__init__()
        self.k = k
        self.edge_fc_s1 = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.offset_s1 = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh())
        self.edge_fc_s2 = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.offset_s2 = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh())
        self.fusion_s1 = nn.Linear(embed_dim, embed_dim, bias=False)
        self.fusion_s2 = nn.Linear(embed_dim, embed_dim, bias=False)
        self.apply(init_transformer_weights)

    def forward(self, latent: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent `[B, D]`, bank `[classes, entries, D]` -> (stage-1 `[B, k, D]`, stage-2 `[B, k, D]`)."""
        if bank.shape[0] < self.k:
            raise ValueError(
                f"the memory bank has {bank.shape[0]} classes, fewer than the k={self.k} derived semantics"
            )
        class_means = bank.mean(dim=1)  # [classes, D]
        distances = torch.cdist(latent, class_means, p=2)  # [B, classes]
        nearest = distances.topk(self.k, dim=-1, largest=False).indices  # [B, k]

        token = latent.unsqueeze(1)  # [B, 1, D]
        edge = self.edge_fc_s1(class_means[nearest] - token)  # [B, k, D]
        edge = edge * self.fusion_s1(edge).softmax(dim=1)  # softmax over the k classes
        stage1 = (1 + self.offset_s1(token + edge)) * token  # [B, k, D]

        entries = bank[nearest]  # [B, k, entries, D]
        anchor = stage1.unsqueeze(2)  # [B, k, 1, D]
        edge = self.edge_fc_s2(entries - anchor)
        edge = edge * self.fusion_s2(edge).softmax(dim=2)  # softmax over the entries
        stage2 = ((1 + self.offset_s2(anchor + edge)) * anchor).sum(dim=2)  # [B, k, D]
        return stage1, stage2
