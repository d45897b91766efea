"""DDESeg (Liu et al., CVPR 2025): audio-visual segmentation by dynamic derivation and elimination.

    audio (waveform or log-mel) --HTS-AT (frozen)--> latent [B, 768]
    latent + memory bank --token enhancer--> k derived audio semantics [B, k, 768]
    image + semantics --MiT with an aligner per stage--> 4 stage features
    features --SegFormer head--> logits, bilinearly upsampled (align_corners=True) to the image

State-dict names are the official ones (`audio_model.*`, `aud_enhancer.*`, `backbone.*`,
`decode_head.*`), so official checkpoints load strictly. The audio memory bank is the buffer
`memory_bank` `[classes, entries, 768]`: absent until `set_memory_bank` is called (so a fresh
model's state dict is exactly the official layout), saved with our checkpoints once set, and
optional when loading (official checkpoints have none).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CHECKPOINT_PARTS: what `set_activation_checkpointing` accepts; the config owns the names.
from ddeseg.config import CHECKPOINT_PARTS, ModelConfig, from_dict
from ddeseg.errors import DDESegError
from ddeseg.models.enhancer import TokenFeatureEnhancer
from ddeseg.models.frontend import LogMelFilterBank, LogMelFrontend, Spectrogram, mel_filterbank
from ddeseg.models.head import HEADS
from ddeseg.models.htsat import HTSAT
from ddeseg.models.mit_aligned import MiTAligned

AUDIO_MODES = ("eval", "official")
MEMORY_BANK_KEY = "memory_bank"


class DDESeg(nn.Module):
    """The DDESeg model, built from a `ModelConfig` (see `build_model` for dicts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.audio.mode not in AUDIO_MODES:
            raise DDESegError(f"model.audio.mode must be one of {AUDIO_MODES}, got {cfg.audio.mode!r}")
        if cfg.head_type not in HEADS:
            raise DDESegError(f"model.head_type must be one of {sorted(HEADS)}, got {cfg.head_type!r}")
        audio_width = cfg.audio.embed_dim * 2 ** (len(cfg.audio.depths) - 1)
        if audio_width != cfg.audio_embed_dim:
            raise DDESegError(
                f"model.audio_embed_dim is {cfg.audio_embed_dim} but the audio backbone's latent is "
                f"{audio_width} wide (embed_dim {cfg.audio.embed_dim}, {len(cfg.audio.depths)} stages)"
            )
        self.cfg = cfg
        self.audio_mode = cfg.audio.mode
        # Not in the official layout until set: see the module docstring.
        self.register_buffer(MEMORY_BANK_KEY, None)

        frontend, audio = cfg.frontend, cfg.audio
        self.audio_model = HTSAT(
            spectrogram_extractor=Spectrogram(frontend.n_fft, frontend.hop_length),
            logmel_extractor=LogMelFilterBank(mel_filterbank(frontend)),
            mel_bins=frontend.mel_bins,
            spec_size=audio.spec_size,
            patch_size=audio.patch_size,
            patch_stride=audio.patch_stride,
            in_chans=audio.in_chans,
            num_classes=audio.num_classes,
            embed_dim=audio.embed_dim,
            depths=audio.depths,
            num_heads=audio.num_heads,
            window_size=audio.window_size,
            mlp_ratio=audio.mlp_ratio,
            qkv_bias=audio.qkv_bias,
            drop_rate=audio.drop_rate,
            attn_drop_rate=audio.attn_drop_rate,
            drop_path_rate=audio.drop_path_rate,
            enable_tscam=audio.enable_tscam,
            fused_attn=cfg.fused_attn,
        )
        self.audio_model.requires_grad_(False)
        self.audio_model.spec_augment = audio.spec_augment
        self.aud_enhancer = TokenFeatureEnhancer(cfg.audio_embed_dim, cfg.derived_semantics)
        visual = cfg.visual
        self.backbone = MiTAligned(
            in_channels=visual.in_channels,
            num_heads=visual.num_heads,
            mlp_ratios=visual.mlp_ratios,
            qkv_bias=visual.qkv_bias,
            drop_rate=visual.drop_rate,
            attn_drop_rate=visual.attn_drop_rate,
            drop_path_rate=visual.drop_path_rate,
            depths=visual.depths,
            sr_ratios=visual.sr_ratios,
            first_patch_stride=visual.first_patch_stride,
            audio_dim=cfg.audio_embed_dim,
            aligner_heads=visual.aligner_heads,
            aligner_clusters=visual.aligner_clusters,
            gumbel_tau=visual.gumbel_tau,
            fused_attn=cfg.fused_attn,
        )
        self.decode_head = HEADS[cfg.head_type](
            cfg.num_classes, visual.in_channels, cfg.head_embedding_dim, cfg.head_dropout
        )
        self.train(self.training)

    # ---- modes
    def train(self, mode: bool = True) -> DDESeg:
        """As `nn.Module.train`, except that in audio mode `eval` the audio backbone stays in eval
        mode (frozen means frozen: fixed bn0 statistics, no SpecAugment, no stochastic depth)."""
        super().train(mode)
        if self.audio_mode == "eval":
            self.audio_model.eval()
        return self

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every MiT/HTS-AT attention between the fused kernel and the explicit softmax."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = enabled

    def set_clustering_noise(self, enabled: bool) -> None:
        """Gumbel noise in the aligners' clustering while training (default on, as the official
        code); off: the noise-free softmax also in training (the official training-step fixture
        was made so; tests that compare two runs use it)."""
        for aligner in self.backbone.av_aligners:
            aligner.gumbel_clustering.noise = enabled

    def set_activation_checkpointing(self, parts: Iterable[str]) -> None:
        """Recompute activations in the backward pass instead of keeping them (GPU memory).

        `parts`, any of `CHECKPOINT_PARTS`: `visual_blocks` (each MiT block), `visual_stages`
        (each whole stage: patch embed, aligner, blocks, norm; fewest kept tensors, but a stage's
        recompute holds all of its blocks at once), `aligners` (each stage's audio projection and
        aligner), `head` (the decoder around its BatchNorm). Empty: off (the plain forward).
        The gradients are those of the plain forward: segments replay their random draws.
        """
        parts = set(parts)
        unknown = sorted(parts - set(CHECKPOINT_PARTS))
        if unknown:
            raise DDESegError(
                f"train.activation_checkpointing: unknown part(s) {unknown}; choose from {list(CHECKPOINT_PARTS)}"
            )
        self.backbone.checkpoint_stages = "visual_stages" in parts
        self.backbone.checkpoint_blocks = "visual_blocks" in parts
        self.backbone.checkpoint_aligners = "aligners" in parts
        self.decode_head.checkpointing = "head" in parts

    def activation_checkpointing(self) -> tuple[str, ...]:
        """The parts currently checkpointed (see `set_activation_checkpointing`)."""
        enabled = {
            "visual_stages": self.backbone.checkpoint_stages,
            "visual_blocks": self.backbone.checkpoint_blocks,
            "aligners": self.backbone.checkpoint_aligners,
            "head": self.decode_head.checkpointing,
        }
        return tuple(part for part in CHECKPOINT_PARTS if enabled[part])

    # ---- memory bank
    def set_memory_bank(self, bank: np.ndarray | torch.Tensor) -> None:
        """Install (or replace) the audio memory bank, float32 `[classes, entries, audio_embed_dim]`.

        Raises `DDESegError` for a wrong shape or dim, or fewer classes than derived semantics.
        The bank follows the model's device (and dtype) and is saved in `state_dict()` as `memory_bank`.
        """
        tensor = torch.as_tensor(np.asarray(bank) if not torch.is_tensor(bank) else bank).detach()
        if tensor.ndim != 3 or tensor.shape[2] != self.cfg.audio_embed_dim:
            raise DDESegError(
                f"memory bank must be [classes, entries, {self.cfg.audio_embed_dim}], got {tuple(tensor.shape)}"
            )
        if tensor.shape[0] < self.cfg.derived_semantics:
            raise DDESegError(
                f"memory bank has {tensor.shape[0]} classes, fewer than model.derived_semantics "
                f"({self.cfg.derived_semantics})"
            )
        if not torch.isfinite(tensor.float()).all():
            raise DDESegError("memory bank contains NaN or infinite values")
        # The bank follows the model's device and floating dtype (float32 unless `.double()`).
        weight = self.aud_enhancer.fusion_s1.weight
        setattr(self, MEMORY_BANK_KEY, tensor.to(device=weight.device, dtype=weight.dtype).clone())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A bank in the file replaces ours (whatever its size); no bank in the file (official
        # checkpoints) keeps ours and is not a missing key.
        key = prefix + MEMORY_BANK_KEY
        if key in state_dict:
            self.set_memory_bank(state_dict[key])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    # ---- forward
    def frontend(self) -> LogMelFrontend:
        """The model's own front end (shares its STFT kernels and filterbank, e.g. a loaded one)."""
        return LogMelFrontend.from_modules(
            self.audio_model.spectrogram_extractor, self.audio_model.logmel_extractor
        )

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio (waveform `[B, samples]` or log-mel `[B, frames, mel]` / `[B, 1, frames, mel]`)
        -> the frozen audio backbone's latent `[B, audio_embed_dim]` (what the memory bank holds)."""
        return self.audio_model.forward_latent(audio)

    def forward_intermediates(self, image: torch.Tensor, audio: torch.Tensor) -> dict[str, Any]:
        """Like `forward`, returning every intermediate:
        `audio_latent [B, 768]`, `enhanced_stage1` and `enhanced_tokens` `[B, k, 768]`,
        `stage_features` (list of 4 NCHW maps) and `logits [B, classes, H, W]`."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
        if audio.shape[0] != image.shape[0]:
            raise ValueError(f"image batch {image.shape[0]} != audio batch {audio.shape[0]}")
        bank = getattr(self, MEMORY_BANK_KEY)
        if bank is None:
            raise DDESegError(
                "the model has no audio memory bank: call model.set_memory_bank(np.load('bank.npy'))"
            )
        # The frozen audio backbone runs in float32 even under autocast: its log-mel, bn0 and
        # latent feed the enhancer's distances to the (float32) memory bank; it keeps no
        # activations for the backward pass, so lower precision would save no memory.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            latent = self.embed_audio(audio.float() if audio.dtype in (torch.float16, torch.bfloat16) else audio)
        stage1, tokens = self.aud_enhancer(latent, bank)
        features = self.backbone(image, tokens)
        logits = self.decode_head(features)
        logits = F.interpolate(logits, size=image.shape[2:], mode="bilinear", align_corners=True)
        return {
            "audio_latent": latent,
            "enhanced_stage1": stage1,
            "enhanced_tokens": tokens,
            "stage_features": features,
            "logits": logits,
        }

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """image float32 `[B, 3, H, W]` (ImageNet-normalised), audio waveform `[B, samples]` or
        log-mel `[B, frames, mel]` / `[B, 1, frames, mel]` -> logits `[B, num_classes, H, W]`."""
        return self.forward_intermediates(image, audio)["logits"]


def build_model(model_cfg: ModelConfig | dict[str, Any] | None = None) -> DDESeg:
    """A `DDESeg` from the `model:` section of a config (a `ModelConfig` or a plain dict with the
    same keys; missing keys take the paper defaults). Weights are randomly initialised as in the
    official code; load pretrained ones with `load_checkpoint`."""
    if model_cfg is None:
        model_cfg = ModelConfig()
    elif isinstance(model_cfg, dict):
        model_cfg = from_dict(ModelConfig, model_cfg, "model")
    elif not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"build_model wants a ModelConfig or a dict, got {type(model_cfg).__name__}")
    return DDESeg(model_cfg)
