"""Dynamic elimination: the audio-visual aligner inserted after every patch embedding.

For one stage with image tokens `x [B, N, C]` and the k derived audio semantics projected to the
stage width `a [B, k, C]`:

1. cluster the image tokens against learned centres (Gumbel-softmax assignment) and replace each
   token by its soft centre;
2. audio-query cross attention over those centres (softmax): what each audio semantic sees;
3. score each semantic (`fc`, softmax over the k semantics) and sum the semantics with those
   weights, which suppresses semantics with no visual counterpart (off-screen sounds);
4. visual-query cross attention on the single weighted audio token with a *sigmoid* instead of a
   softmax (one key: a gate per head), added back to the image tokens.

Gumbel noise is used in training only. The official code calls `F.gumbel_softmax` in eval mode
too, which makes its predictions random; in eval we use the noise-free limit, the tempered
softmax `softmax(logits / tau)` (the reference fixture was produced that way).

`av_cros_interaction.proj` / `va_cros_interaction.proj` and `layer_norm` exist in the official
model but are never used in its forward; they are kept so its checkpoints load strictly and the
parameter counts match (they receive no gradient: DDP needs `find_unused_parameters=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.models.layers import init_transformer_weights


class CrossModalAttention(nn.Module):
    """Multi-head cross attention `query [B, Nq, C]` x `context [B, Nk, C]` -> `[B, Nq, C]`.

    `gate='softmax'` normalises the scores over the context; `gate='sigmoid'` squashes each score
    on its own. There is no output projection in the forward (see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"aligner width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)  # unused by the official forward; kept for its checkpoints
        self.apply(init_transformer_weights)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, h, N, C/h]

    def forward(self, query: torch.Tensor, context: torch.Tensor, gate: str = "softmax") -> torch.Tensor:
        B, N, C = query.shape
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(context)),
            self._heads(self.v_proj(context)),
        )
        scores = (q @ k.transpose(-2, -1)) * self.scale  # [B, h, Nq, Nk]
        scores = scores.softmax(dim=-1) if gate == "softmax" else torch.sigmoid(scores)
        return (scores @ v).transpose(1, 2).reshape(B, N, C)


class GumbelClustering(nn.Module):
    """Soft assignment of tokens to `num_clusters` learned centres; returns each token's soft
    centre `[B, N, C]` and the assignment `[B, N, clusters]`."""

    def __init__(self, num_clusters: int, dim: int, tau: float = 1.0):
        super().__init__()
        self.tau = tau
        # False: the noise-free softmax in training too (the official training-step fixture was
        # made that way); the model's default is the official Gumbel noise.
        self.noise = True
        self.cluster_centers = nn.Parameter(torch.randn(num_clusters, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = x @ self.cluster_centers.t()  # [B, N, clusters]
        if self.training and self.noise:
            assignment = F.gumbel_softmax(logits, tau=self.tau, hard=False, dim=-1)
        else:
            assignment = torch.softmax(logits / self.tau, dim=-1)  # deterministic eval (see module doc)
        return assignment @ self.cluster_centers, assignment


class AudioVisualAligner(nn.Module):
    """One stage's dynamic elimination: image tokens `[B, N, C]` + audio semantics `[B, k, C]`
    -> image tokens `[B, N, C]` (residual)."""

    def __init__(self, dim: int, num_heads: int = 8, num_clusters: int = 5, tau: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(dim, 1)
        self.layer_norm = nn.LayerNorm(dim)  # unused by the official forward; kept for its checkpoints
        self.gumbel_clustering = GumbelClustering(num_clusters, dim, tau)
        self.av_cros_interaction = CrossModalAttention(dim, num_heads)
        self.va_cros_interaction = CrossModalAttention(dim, num_heads)

    def forward(self, audio: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        centres, _ = self.gumbel_clustering(image)
        seen = self.av_cros_interaction(audio, centres, gate="softmax")  # [B, k, C]
        scores = self.fc(seen).softmax(dim=1)  # [B, k, 1], over the k semantics
        kept = (scores * audio).sum(dim=1, keepdim=True)  # [B, 1, C]
        return image + self.va_cros_interaction(image, kept, gate="sigmoid")
