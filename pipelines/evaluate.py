"""The `ddeseg evaluate` stage: a checkpoint and a split of a prepared folder -> `eval.json`,
`eval.md`, `eval.html`, `pictures/` and `config.yaml`. Scoring is `ddeseg.scoring`, the audio
controls `ddeseg.audio_controls`, the choice of pictured frames `ddeseg.picture_choice`; this
module loads and checks the inputs, runs them, and writes the outputs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddeseg.config import Config, check_overrides
from ddeseg.distributed import DistributedContext, barrier
from ddeseg.errors import DDESegError
from ddeseg.fileio import reporting_disk_full
from ddeseg.inference import InferenceModel, load_for_inference, require_bank_classes, require_output_folder
from ddeseg.stage import ConfigSource, write_stage_config
from ddeseg.visualize import (
    audio_label,
    contact_sheet,
    frame_picture,
    picture_name,
    save_png,
    video_strip,
)

if TYPE_CHECKING:
    from ddeseg.data.shards import ShardIndex
from ddeseg.picture_choice import PictureCollector
from ddeseg.scoring import evaluate_model

EVAL_JSON, EVAL_MD, EVAL_HTML = "eval.json", "eval.md", "eval.html"
PICTURES_DIR, WORST_SHEET = "pictures", "worst-frames.png"


@dataclass
class EvaluatePaths:
    """What `run_evaluation` reads and writes (its settings are `config.eval`, and the loader's
    `data.eval_batch_size`, `data.num_workers`)."""

    checkpoint: Path
    shards: Path
    out: Path  # eval.json, eval.md, eval.html, pictures/, config.yaml
    memory_bank: Path | None = None  # required for official checkpoints (they hold no bank)


def run_evaluation(
    config: ConfigSource,
    paths: EvaluatePaths,
    context: DistributedContext,
    *,
    progress: bool = True,
    pictures: PictureCollector | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split of prepared shards and, on rank 0, write `eval.json`,
    `eval.md`, `pictures/` and `config.yaml` into `paths.out`. Returns the eval.json dict (every rank).

    The config is the checkpoint's (or `config.file`, required for official checkpoints) with
    `config.overrides` on top; `eval.split`, `eval.audio_control`, `eval.pictures`,
    `eval.worst_frames`, `task`, `data.eval_batch_size` and `data.num_workers` decide the run.

    A split not scored whole (frames of a corrupt or cut shard skipped) gives `"partial": true`
    with `counts.frames_not_scored` and `skipped_shards`, and a warning; `ddeseg evaluate` then
    exits 3 unless `--allow-partial`.

    `pictures`: the frames to draw (default: `eval.pictures` chosen frames seeded by
    `train.seed`, `eval.worst_frames` worst); the caller may read its frames afterwards (the demo
    passes the frames the normal evaluation chose to the shuffled and silent ones)."""
    out_dir = require_output_folder(paths.out)
    index, loaded = load_checked(config, paths)
    config = loaded.config  # resolved (eval.audio_control and eval.split are checked on load)
    task, split = config.task, config.eval.split
    class_names = index.task_class_names(task)
    _warn_checkpoint(loaded, index, context)
    shards = index.shards(task, split)
    total = index.count(task, split, annotated_only=True)
    errors_dir = out_dir / "data_errors"
    result, collector = _evaluate_split(
        loaded.model, config, index, shards, total, errors_dir, context, progress=progress, pictures=pictures
    )
    barrier()  # every rank's loader workers have written their error logs
    report = build_report(result, config, paths.checkpoint, loaded, total=total, errors_dir=errors_dir, world_size=context.world_size)
    report["shards"] = str(Path(paths.shards).resolve())
    report.update(partial_result(report["counts"]["frames_not_scored"], errors_dir, shards, index.root))
    if context.is_main:
        with reporting_disk_full(out_dir, "the evaluation"):  # one line, not a traceback
            _write_and_announce(report, collector, out_dir, class_names, config, errors_dir)
    return report


def load_checked(config: ConfigSource, paths: EvaluatePaths) -> tuple[ShardIndex, InferenceModel]:
    """`(ShardIndex, InferenceModel)`: the shard folder and the checkpoint, checked against each
    other before any frame is read (overrides, front end, number of classes, memory bank)."""
    from ddeseg.data.shards import ShardIndex

    check_overrides(config.overrides)  # a typo fails now, not after the checkpoint is read
    index = ShardIndex(paths.shards)
    loaded = load_for_inference(paths.checkpoint, config.file, config.overrides, paths.memory_bank)
    index.check_frontend(loaded.model, checkpoint=paths.checkpoint)  # shards' log-mels vs the model's filterbank
    task = loaded.config.task
    expected = index.num_outputs(task)
    if loaded.config.model.num_classes != expected:
        raise DDESegError(
            f"the model has {loaded.config.model.num_classes} output classes but task {task!r} of {index.root} needs"
            f" {expected}: evaluate it on its own task (--task) or with the matching --config"
        )
    require_bank_classes(loaded, len(index.bank_class_ids(task)), f"{task} of {index.root}")
    return index, loaded


def _warn_checkpoint(loaded: InferenceModel, index: ShardIndex, context: DistributedContext) -> None:
    """On the main rank, the checkpoint's own warning and a class list unlike the shards'."""
    from ddeseg.progress import console

    if loaded.warning() and context.is_main:
        console.print(f"[yellow]warning[/]: {loaded.warning()}")
    if loaded.classes and loaded.classes != index.class_names() and context.is_main:
        console.print(f"[yellow]warning[/]: the checkpoint's class list differs from the one of {index.root}")


def _clear_errors_dir(errors_dir: Path, context: DistributedContext) -> None:
    """Remove a previous run's data-error logs on the main rank; every rank waits for it."""
    if context.is_main and errors_dir.exists():
        shutil.rmtree(errors_dir)  # a previous run's skips are not this run's
    barrier()


def _evaluate_split(
    model: torch.nn.Module,
    config: Config,
    index: ShardIndex,
    shards: Sequence[str],
    total: int,
    errors_dir: Path,
    context: DistributedContext,
    *,
    progress: bool,
    pictures: PictureCollector | None = None,
) -> tuple[dict[str, Any], PictureCollector]:
    """`evaluate_model`'s result and pictures on `shards` (`config`'s task and split, `total`
    annotated frames), run deterministically on `context.device` under a frames progress bar;
    the loaders log unreadable data in `errors_dir`, emptied first of a previous run's logs."""
    from ddeseg.data.stream import make_eval_loader
    from ddeseg.progress import stage_progress

    task, split = config.task, config.eval.split
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    model.to(context.device)
    _clear_errors_dir(errors_dir, context)
    loader = make_eval_loader(
        shards,
        config,
        rank=context.rank,
        world_size=context.world_size,
        errors_dir=errors_dir,
        label_lut=index.label_lut(task, config.model.num_classes),
    )
    collector = pictures if pictures is not None else PictureCollector(
        samples=config.eval.pictures, worst=config.eval.worst_frames, seed=config.train.seed
    )
    bar = stage_progress("frames", enabled=context.is_main and progress)
    with bar:
        task_id = bar.add_task(f"evaluate {task}/{split}", total=total)
        result = evaluate_model(
            model,
            loader,
            config,
            context,
            audio_control=config.eval.audio_control,
            pictures=collector,
            class_names=index.task_class_names(task),
            progress=(bar, task_id),
        )
        # The frames scored, not the manifest's count: a bar must not claim a split it did not score.
        bar.update(task_id, completed=result["num_frames"])
    return result, collector


def build_report(
    result: dict[str, Any],
    config: Config,
    checkpoint: Path,
    loaded: InferenceModel,
    *,
    total: int,
    errors_dir: Path,
    world_size: int,
) -> dict[str, Any]:
    """The eval.json dict (without `partial` and pictures) from `evaluate_model`'s `result` on
    `config`'s task and split of `total` annotated frames, the `loaded` checkpoint's provenance,
    and the data errors the loaders logged in `errors_dir`."""
    from ddeseg.data.stream import count_data_errors

    return {
        "miou": result["miou"],
        "fscore": result["fscore"],
        "f1": result["f1"],
        "avsbench_miou": result["avsbench_miou"],
        "avsbench_fscore": result["avsbench_fscore"],
        "avsbench_protocol": result["avsbench_protocol"],
        "per_class": {entry["name"]: {"id": k, **_plain(entry, drop=("name",))} for k, entry in result["per_class"].items()},
        "confusion": result.get("confusion"),  # [GT][predicted] pixels; write_outputs summarises it
        "task": config.task,
        "split": config.eval.split,
        "binary": result["binary"],
        "num_classes": result["num_classes"],
        # Absolute: eval.json must say which files it scored wherever it is read from.
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_format": loaded.format,
        "checkpoint_step": loaded.step,
        "memory_bank": loaded.memory_bank if loaded.memory_bank == "checkpoint" else str(Path(loaded.memory_bank).resolve()),
        "audio_control": config.eval.audio_control,
        "audio_control_unchanged_frames": result["audio_control_unchanged_frames"],
        "counts": {
            "frames": result["num_frames"],
            "frames_in_manifest": total,
            "pixels": result["num_pixels"],
            "classes_evaluated": result["num_classes_evaluated"],
            "frames_not_scored": max(0, total - int(result["num_frames"])),
            "skipped_samples": count_data_errors(errors_dir),
            "world_size": world_size,
            **{k: result[k] for k in ("num_videos", "num_empty_target_frames", "duplicate_frames") if k in result},
        },
    }


def _write_and_announce(
    report: dict[str, Any], collector: PictureCollector, out_dir: Path, class_names: Sequence[str], config: Config, errors_dir: Path
) -> None:
    """The main rank's part: eval.json / eval.md / eval.html / pictures, config.yaml, the score
    tables, and a one-line warning on stderr when the result is partial."""
    from ddeseg.progress import console

    out_dir.mkdir(parents=True, exist_ok=True)
    write_stage_config(config, out_dir)  # first: the pages link to it
    write_outputs(report, collector, out_dir, class_names)
    print_report(report, console)
    if report["partial"]:
        counts = report["counts"]
        # print, not rich: one line whatever the terminal width, as the CLI's errors
        print(
            f"warning: partial result: {counts['frames_not_scored']} of {counts['frames_in_manifest']} frames of"
            f" {report['task']}/{report['split']} not scored (unreadable"
            f" data in {', '.join(report['skipped_shards']) or 'a shard'}; details in {errors_dir});"
            ' eval.json says "partial": true',
            file=sys.stderr, flush=True,
        )


def partial_result(not_scored: int, errors_dir: Path, shards: Sequence[str], root: Path) -> dict[str, Any]:
    """eval.json's `partial` (frames of the split not scored) and, when partial, `skipped_shards`:
    the shards the loaders logged as unreadable, relative to the shard folder `root`."""
    from ddeseg.data.stream import read_data_errors

    if not_scored <= 0:
        return {"partial": False}
    read = {str(Path(shard)) for shard in shards}
    logged = {str(r["shard"]) for r in read_data_errors(errors_dir) if r.get("shard")}
    return {
        "partial": True,
        "skipped_shards": sorted(str(Path(shard).relative_to(root)) if shard in read else shard for shard in logged),
    }


def _plain(entry: dict[str, Any], drop: Sequence[str] = ()) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in drop}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_outputs(report: dict[str, Any], collector: PictureCollector, out_dir: Path, class_names: Sequence[str]) -> None:
    """`eval.json`, `eval.md`, `eval.html` and `pictures/` (replaced whole, so no stale picture
    stays). Adds to `report` what was drawn (`pictures`, `samples`, `video_strips`,
    `worst_frames`) and turns a `confusion` matrix into its per-class summary."""
    from ddeseg.report import confusion_summary, evaluation_report, render_html, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    pictures_dir = out_dir / PICTURES_DIR
    if pictures_dir.exists():
        shutil.rmtree(pictures_dir)
    control = str(report.get("audio_control", "none"))
    samples = []
    for i, (why, frame) in enumerate(collector.chosen_frames()):
        name = save_png(frame_picture(frame, class_names, control, label=why), pictures_dir / picture_name(i, frame.key)).name
        samples.append({
            "key": frame.key, "why": why, "video": frame.video, "frame": frame.frame,
            "iou": _finite(frame.score), "picture": f"{PICTURES_DIR}/{name}",
        })
    strips = []
    for label, video, score, frames in collector.video_strips():
        picture = video_strip(frames, f"{label} video {video}: video IoU {score:.3f}", class_names, control)
        name = save_png(picture, pictures_dir / f"video-{label}-{re.sub(r'[^A-Za-z0-9_-]', '_', video)}.png").name
        strips.append({"label": label, "video": video, "iou": score, "frames": len(frames), "picture": f"{PICTURES_DIR}/{name}"})
    worst = collector.worst_frames()
    written = [s["picture"] for s in samples] + [s["picture"] for s in strips]
    if worst:
        sheet = contact_sheet(worst, class_names=class_names, audio_control=control)
        written.append(f"{PICTURES_DIR}/{save_png(sheet, pictures_dir / WORST_SHEET).name}")
    report["pictures"] = written
    report["samples"] = samples
    report["frame_iou_median"] = collector.median_score()
    report["video_strips"] = strips
    report["worst_frames"] = [{"key": f.key, "iou": f.score} for f in worst]
    if isinstance(report.get("confusion"), list):
        report["confusion"] = confusion_summary(report["confusion"], class_names)
    write_text(out_dir / EVAL_JSON, json.dumps(report, indent=1, sort_keys=False, allow_nan=False, default=_json_default) + "\n")
    write_text(out_dir / EVAL_MD, markdown_report(report))
    write_text(out_dir / EVAL_HTML, render_html(evaluation_report(report)))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_report(report: dict[str, Any]) -> str:
    """The eval.md text: settings, both protocols' scores, per class, confusion summary, pictures
    (the same content as eval.html; `ddeseg.report.evaluation_report`)."""
    from ddeseg.report import evaluation_report, render_markdown

    return render_markdown(evaluation_report(report))


def print_report(report: dict[str, Any], console: Any) -> None:
    """Rich tables of the overall and per-class scores, and where the report folder is."""
    from rich.table import Table

    from ddeseg.report import fmt

    audio = audio_label(report["audio_control"])
    overall = Table(title=f"{report['task']} / {report['split']}  (audio: {audio}, {report['counts']['frames']} frames)")
    for column in ("protocol", "mIoU", "F-score", "F1"):
        overall.add_column(column, justify="left" if column == "protocol" else "right")
    overall.add_row("DDESeg", fmt(report["miou"]), fmt(report["fscore"]), fmt(report["f1"]))
    overall.add_row(report["avsbench_protocol"], fmt(report["avsbench_miou"]), fmt(report["avsbench_fscore"]), "–")
    console.print(overall)
    per_class = Table(title="per class (DDESeg protocol)")
    # No F1 column here (eval.md has it): the table must stay readable in an 80-column terminal.
    for column in ("id", "class", "IoU", "F-score", "GT px", "pred px", "GT frames", "most painted instead"):
        per_class.add_column(column, justify="left" if column in ("class", "most painted instead") else "right")
    confusion = report.get("confusion") if isinstance(report.get("confusion"), dict) else {}
    for name, entry in report["per_class"].items():
        instead = next(iter(confusion.get(name, {}).items()), None)
        per_class.add_row(
            str(entry["id"]), name, fmt(entry["iou"]), fmt(entry["fscore"]),
            str(entry["target_pixels"]), str(entry["predicted_pixels"]), str(entry.get("target_frames", "–")),
            f"{instead[0]} ({instead[1]} px)" if instead else "",
        )
    console.print(per_class)
