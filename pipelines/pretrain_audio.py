"""`ddeseg pretrain-audio`: train the HTS-AT audio backbone as a multi-label sound-event classifier.

DDESeg keeps its audio backbone frozen, so it needs one that already tells sounds apart. The
paper starts from an AudioSet HTS-AT checkpoint; where none can be had (the synthetic demo), or
to adapt HTS-AT to a new dataset's own sound classes, this recipe trains it on the prepared
training shards: the labels of a clip are the classes present in its frame's mask (the visible
sounding objects), silent seconds are all-negative examples, unannotated frames are skipped.

Off-screen sounds are in the audio but not in the mask, so the labels are noisy in the way the
benchmarks are; the classifier still learns each class's sound from the many clean examples.

Output: `RUN_DIR/audio.pt`, a bare HTS-AT state dict under `state_dict` (what
`ddeseg.models.load_checkpoint` reads as format `htsat`), with `classes`, `config`, the final
validation metrics and the RNG state beside it (written as `train`'s checkpoints are, by
`ddeseg.training.checkpoint.save_training_checkpoint`; the schedule is `ddeseg.training.schedule`'s); `RUN_DIR/metrics.jsonl`, `RUN_DIR/config.yaml`.

Log-mels come from the shards (precomputed by `prepare`) and are held in memory as float16:
about 11 KB a clip, 0.5 GB for all of AVSS.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddeseg.config import Config, to_dict
from ddeseg.data import schema
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import read_shard_samples
from ddeseg.distributed import resolve_device
from ddeseg.errors import DataError
from ddeseg.models import build_model
from ddeseg.progress import console, stage_progress, training_progress
from ddeseg.stage import RunOptions, write_stage_config
from ddeseg.training.checkpoint import save_training_checkpoint
from ddeseg.training.run_info import check_run_dir
from ddeseg.training.run_log import RunLog
from ddeseg.training.schedule import warmup_cosine_lr

AUDIO_CHECKPOINT_FORMAT = "ddeseg-audio-1"


@dataclass
class AudioExamples:
    """Log-mels `[N, frames, mel]` (float16) and multi-hot targets `[N, classes]` (float32)."""

    logmels: torch.Tensor
    targets: torch.Tensor
    keys: list[str]


def read_audio_examples(shards: list[str], sound_class_ids: list[int], description: str = "read audio") -> AudioExamples:
    """Read `logmel.npy` and the mask classes of every annotated sample of `shards`.

    Target column `j` is unified class id `sound_class_ids[j]`; other ids (background, ignore)
    are no sound class.
    """
    column_of = {class_id: column for column, class_id in enumerate(sound_class_ids)}
    num_classes = len(sound_class_ids)
    logmels, targets, keys = [], [], []
    with stage_progress("clips") as progress:
        task = progress.add_task(description, total=None)
        # Raw bytes only (no decoder, so no pickle); a corrupt shard stops the run naming it.
        for sample in read_shard_samples(shards):
            meta = schema.SampleMeta.from_json(sample[schema.META])
            if not meta.annotated:
                continue
            target = np.zeros(num_classes, dtype=np.float32)
            for class_id in meta.classes:
                if class_id in column_of:
                    target[column_of[class_id]] = 1.0
            logmels.append(torch.from_numpy(schema.decode_array(sample[schema.LOGMEL]).astype(np.float16)))
            targets.append(torch.from_numpy(target))
            keys.append(meta.key)
            progress.advance(task)
    if not keys:
        raise DataError(f"no annotated samples in {len(shards)} shard(s) (first: {shards[:1]})")
    return AudioExamples(torch.stack(logmels), torch.stack(targets), keys)


@torch.no_grad()
def evaluate_classifier(audio_model: torch.nn.Module, examples: AudioExamples, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """Clip-level metrics at threshold 0.5: exact-match accuracy, micro F1, and the accuracy of
    the top class on single-source clips (the ones the memory bank is built from)."""
    audio_model.eval()
    scores = []
    for start in range(0, len(examples.keys), batch_size):
        batch = examples.logmels[start : start + batch_size].to(device, torch.float32)
        scores.append(audio_model(batch)["clipwise_output"].float().cpu())
    probabilities = torch.cat(scores)
    predicted = probabilities > 0.5
    truth = examples.targets > 0.5
    tp = (predicted & truth).sum().item()
    fp = (predicted & ~truth).sum().item()
    fn = (~predicted & truth).sum().item()
    single = truth.sum(dim=1) == 1
    top1 = (probabilities[single].argmax(dim=1) == truth[single].float().argmax(dim=1)).float().mean().item() if single.any() else float("nan")
    return {
        "exact_match": (predicted == truth).all(dim=1).float().mean().item(),
        "micro_f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "single_source_top1": top1,
        "clips": float(len(examples.keys)),
    }


@dataclass
class PretrainAudioPaths:
    """What `pretrain_audio` reads and writes (its settings are `config.pretrain_audio`)."""

    shards: Path  # a prepared directory
    out: Path  # RUN_DIR: audio.pt, metrics.jsonl, config.yaml


def pretrain_audio(config: Config, paths: PretrainAudioPaths, run: RunOptions = RunOptions()) -> dict[str, float]:
    """Train `model.audio_model` of `config` on the shards of `config.task` with the recipe
    `config.pretrain_audio` (seeded by `train.seed`) on `run.device`; write `audio.pt`, and
    `config.yaml` (the resolved config, the classifier's class count included) at the start.
    Returns the final classifier metrics."""
    out_dir = paths.out
    check_run_dir(out_dir)  # before reading any audio: an --out that is a file fails now, not at the end
    device = resolve_device(run.device)
    config = copy.deepcopy(config)  # derived values below must not leak into the caller's config
    index = ShardIndex(paths.shards)
    sound_class_ids = task_sound_class_ids(index, config.task)
    # The classifier head predicts the dataset's sound classes, whatever the config says; DDESeg
    # later loads everything but that head (it only uses the latent).
    config.model.audio.num_classes = len(sound_class_ids)
    torch.manual_seed(config.train.seed)
    generator = torch.Generator().manual_seed(config.train.seed)

    train_examples = read_audio_examples(index.shards(config.task, "train"), sound_class_ids, "read train audio")
    val_examples = (
        read_audio_examples(index.shards(config.task, "val"), sound_class_ids, "read val audio")
        if index.has_split(config.task, "val")
        else None
    )
    audio_model = build_audio_classifier(config, index, device)
    recipe = config.pretrain_audio
    optimizer = torch.optim.AdamW([p for p in audio_model.parameters() if p.requires_grad], lr=recipe.base_lr, weight_decay=recipe.weight_decay)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_stage_config(config, out_dir)
    run_log = RunLog(out_dir)
    console.print(
        f"[bold]pretrain-audio[/]: {len(train_examples.keys)} train clips, {len(sound_class_ids)} sound classes,"
        f" {sum(p.numel() for p in audio_model.parameters()) / 1e6:.2f}M parameters, {recipe.steps} steps on {device}"
    )
    batches = _batch_indices(len(train_examples.keys), recipe.batch_size, generator)
    started, running, window = time.time(), 0.0, 0
    audio_model.train()
    with training_progress(enabled=run.progress) as progress:
        task = progress.add_task("pretrain-audio", total=recipe.steps, loss=float("nan"), lr=0.0, rate=0.0)
        for step in range(recipe.steps):
            batch_ids = next(batches)
            lr = warmup_cosine_lr(
                step, base_lr=recipe.base_lr, min_lr=recipe.min_lr, warmup_steps=recipe.warmup_steps, total_steps=recipe.steps
            )
            loss = pretrain_step(audio_model, optimizer, train_examples, batch_ids, lr, device)
            running, window = running + loss, window + 1
            if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
                rate = (step + 1) * recipe.batch_size / (time.time() - started)
                run_log.log({"step": step + 1, "loss": running / window, "lr": lr, "clips_per_s": rate})
                progress.update(task, completed=step + 1, loss=running / window, lr=lr, rate=rate)
                running, window = 0.0, 0
            else:
                progress.update(task, completed=step + 1)
            if val_examples is not None and ((step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps):
                run_log.log({"step": step + 1, "split": "val", **evaluate_classifier(audio_model, val_examples, device)})
                audio_model.train()

    final = evaluate_classifier(audio_model, val_examples if val_examples is not None else train_examples, device)
    final["split"] = "val" if val_examples is not None else "train"
    run_log.log({"step": recipe.steps, **final})
    run_log.close()
    audio_model.eval()
    classes = [index.class_names()[class_id] for class_id in sound_class_ids]
    save_audio_checkpoint(out_dir / "audio.pt", audio_model, config, classes, sound_class_ids, final)
    console.print(
        f"[bold green]done[/]: {final['split']} exact-match {final['exact_match']:.3f}, micro-F1 {final['micro_f1']:.3f},"
        f" single-source top-1 {final['single_source_top1']:.3f}; checkpoint {out_dir / 'audio.pt'}"
    )
    return final


def task_sound_class_ids(index: ShardIndex, task: str) -> list[int]:
    """Unified class ids of the task's sound classes (background left out): v2 the AVSS list,
    VPO-* the VPO list; binary tasks keep every unified class, since their masks still carry
    the category where the raw data has one."""
    task_ids = index.protocol(task).get("ids") or list(range(len(index.class_names())))
    return [class_id for class_id in task_ids if class_id != 0]


def build_audio_classifier(config: Config, index: ShardIndex, device: torch.device) -> torch.nn.Module:
    """HTS-AT of `config.model`, trainable except its DSP front end, on `device`."""
    audio_model = build_model(config.model).audio_model.to(device)
    index.check_frontend(audio_model)  # the shards' log-mels must be this front end's
    audio_model.requires_grad_(True)
    # The STFT kernels and mel filterbank are DSP constants, not weights to learn.
    audio_model.spectrogram_extractor.requires_grad_(False)
    audio_model.logmel_extractor.requires_grad_(False)
    return audio_model


def _batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Clip indices of each batch: a random order, drawn again when a batch would run past it."""
    order, cursor = torch.randperm(count, generator=generator), 0
    while True:
        if cursor + batch_size > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def pretrain_step(
    audio_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: AudioExamples,
    batch_ids: torch.Tensor,
    lr: float,
    device: torch.device,
) -> float:
    """One optimizer step of the multi-label binary cross-entropy at learning rate `lr`; the loss."""
    logmel = examples.logmels[batch_ids].to(device, torch.float32)
    target = examples.targets[batch_ids].to(device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    probabilities = audio_model(logmel)["clipwise_output"].float().clamp(1e-7, 1 - 1e-7)
    loss = F.binary_cross_entropy(probabilities, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(audio_model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


def save_audio_checkpoint(
    path: Path,
    audio_model: torch.nn.Module,
    config: Config,
    classes: list[str],
    class_ids: list[int],
    metrics: dict[str, Any],
) -> None:
    """`audio.pt`: the HTS-AT state dict (on the CPU) under `state_dict`, what
    `ddeseg.models.load_checkpoint` reads as format htsat, with the classes of its head, the
    config, the final float metrics and the RNG state, written atomically."""
    save_training_checkpoint(
        path,
        {
            "format": AUDIO_CHECKPOINT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in audio_model.state_dict().items()},
            "classes": classes,
            "class_ids": class_ids,
            "config": to_dict(config),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
        },
    )
