"""`ddeseg demo`: the whole pipeline on a synthetic dataset, sized for a laptop CPU.

synth (v2-style semantic set, `ddeseg` layout) -> prepare -> pretrain-audio -> build-memory-bank
-> train (configs/demo.yaml) -> evaluate on test, with the shuffled-audio and silent-audio
controls -> report (`report.md`, `report.html`, `eval.json`, a loss curve, overlay pictures).

Every stage is the real one, called through its Python entry point with the paths of this run;
nothing is special-cased for the demo except the sizes in `DemoPlan`.

Layout of `--out DIR`:

    DIR/raw/          the synthetic raw dataset (+ synth_meta.json)
    DIR/shards/       prepared shards
    DIR/audio/        pretrain-audio run (audio.pt)
    DIR/bank/         bank.npy, bank.json
    DIR/run/          training run (config.yaml, metrics.jsonl, last.pt, best.pt)
    DIR/eval/{normal,shuffled,silent}/   evaluate outputs (eval.html, eval.json, pictures/ each)
    DIR/eval.json, DIR/report.md, DIR/report.html, DIR/loss.png, DIR/pictures/ (normal audio)
    DIR/controls/     the chosen frames, each under the three audio conditions side by side
    DIR/config.yaml   the resolved config (every stage folder holds its own too)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddeseg.config import Config, load_config, resolve_config_path
from ddeseg.errors import DDESegError
from ddeseg.progress import console
from ddeseg.stage import ConfigSource, RunOptions, write_stage_config

if TYPE_CHECKING:
    from ddeseg.picture_choice import PictureCollector

CONTROLS = ("shuffled", "silent")
PICTURES = 8  # frames drawn under the three audio conditions (2 best, 2 median, 2 worst, 2 random)
CONTROLS_DIR = "controls"


@dataclass
class DemoPlan:
    """Sizes of one demo run. `for_minutes` scales the default (about 6 minutes of pipeline on
    2 CPU cores) to another budget: data, audio steps and training steps grow together."""

    videos: int = 96
    classes: int = 8
    image_size: int = 96  # synthetic frames (height); the model sees data.image_size
    pretrain_steps: int = 300
    train_steps: int = 600
    bank_k: int = 16
    seed: int = 0
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def for_minutes(cls, minutes: float, **changes: Any) -> DemoPlan:
        scale = max(0.05, minutes / 6.0)
        plan = cls(
            videos=max(12, round(96 * min(scale, 2.0))),
            pretrain_steps=max(10, round(300 * scale)),
            train_steps=max(10, round(600 * scale)),
        )
        for key, value in changes.items():
            setattr(plan, key, value)
        return plan


def _stage(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            console.rule(f"[bold]{name}")
            self.started = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.started

    return _Timer()


MAX_SYNTH_TRIES = 6


def classes_with_training_samples(raw: Path) -> set[int]:
    """Class ids that the memory bank will find: the sounding class of an annotated, non-silent,
    single-source training frame (from the generator's ground truth, `synth_meta.json`)."""
    meta = json.loads((raw / "synth_meta.json").read_text())
    found: set[int] = set()
    for video in meta["videos"]:
        if video["split"] != "train":
            continue
        for frame in video["frames"]:
            if frame["annotated"] and not frame["silent"] and len(frame["sounding_classes"]) == 1:
                found.update(frame["sounding_classes"])
    return found


def synth_covering_every_class(raw_dir: Path, plan: DemoPlan) -> Path:
    """Write the demo's synthetic set, with more videos until every class has training samples.

    A small budget draws few videos, and a class that no single-source training frame shows has
    no memory-bank row: the bank refuses it. The draw is seeded, so the videos needed for a
    (budget, classes, seed) are always the same; `plan.videos` records the final count."""
    from ddeseg.pipelines.synth import generate

    videos = plan.videos
    for attempt in range(MAX_SYNTH_TRIES):
        raw = generate(
            "ddeseg", raw_dir, videos=videos, classes=plan.classes, seed=plan.seed,
            image_size=plan.image_size, tasks=["v2"], overwrite=attempt > 0,
        )
        missing = set(range(1, plan.classes + 1)) - classes_with_training_samples(raw)
        if not missing:
            plan.videos = videos
            return raw
        console.print(f"{len(missing)} class(es) without a training sample in {videos} videos: adding videos")
        tried, videos = videos, videos + max(plan.classes, videos // 2)
    raise DDESegError(
        f"{raw_dir}: class(es) {sorted(missing)} have no single-source training frame in {tried} videos; "
        "try another --seed or fewer --classes"
    )


def demo_config(plan: DemoPlan, config_path: str | Path = "demo") -> Config:
    """configs/demo.yaml with the class counts of the synthetic set, the plan's steps, bank size
    and seed, then the plan's overrides (`ddeseg demo --set`)."""
    return load_config(
        resolve_config_path(config_path),
        [
            f"model.num_classes={plan.classes + 1}",
            f"model.audio.num_classes={plan.classes}",
            f"train.steps={plan.train_steps}",
            "train.epochs_equivalent=null",
            f"train.eval_every={max(1, plan.train_steps // 3)}",
            f"train.checkpoint_every={max(1, plan.train_steps // 3)}",
            f"pretrain_audio.steps={plan.pretrain_steps}",
            f"train.seed={plan.seed}",
            f"memory_bank.k={plan.bank_k}",
            f"memory_bank.seed={plan.seed}",
            *plan.overrides,
        ],
    )


@dataclass
class DemoPaths:
    """Where the demo writes (see the module docstring for the layout)."""

    out: Path


def _evaluate_with_controls(
    out: Path, plan: DemoPlan, context: Any, run: RunOptions
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """best.pt on the test split under normal audio and each control. best.pt is chosen on the val
    split; the test split is only scored here. The normal evaluation chooses the frames to draw;
    the controls keep the same frames, so that each is shown under the three audio conditions
    side by side. Returns the eval.json dicts and the picture collectors, by control."""
    from ddeseg.picture_choice import PictureCollector
    from ddeseg.pipelines.evaluate import EvaluatePaths, run_evaluation

    results: dict[str, dict[str, Any]] = {}
    collectors: dict[str, PictureCollector] = {}
    for control in ("none", *CONTROLS):
        settings = ("eval.split=test", f"eval.audio_control={control}", f"eval.pictures={PICTURES}", f"eval.worst_frames={PICTURES}")
        keep = None if control == "none" else {s["key"]: s["why"] for s in results["none"]["samples"]}
        collectors[control] = PictureCollector(samples=PICTURES, worst=PICTURES, seed=plan.seed, keep=keep)
        results[control] = run_evaluation(
            ConfigSource(overrides=settings),  # the config stored in best.pt: the demo's
            EvaluatePaths(checkpoint=out / "run" / "best.pt", shards=out / "shards", out=out / eval_dir(control)),
            context,
            progress=run.progress,
            pictures=collectors[control],
        )
    return results, collectors


def run_demo(
    config: Config, paths: DemoPaths, plan: DemoPlan, run: RunOptions = RunOptions(overwrite=True)
) -> dict[str, Any]:
    """Run every stage into `paths.out` with `config` (`demo_config(plan, ...)`: every stage's
    section of it) and the sizes of `plan`; return the demo's eval.json dict (metrics + controls).
    `run.overwrite` (the default) replaces an earlier demo's folders in `out`; training and the
    audio pretraining run on the CPU (the demo's numbers are the same on any machine)."""
    from ddeseg.distributed import DistributedContext
    from ddeseg.pipelines.build_memory_bank import MemoryBankPaths, build_memory_bank
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.pipelines.pretrain_audio import PretrainAudioPaths, pretrain_audio
    from ddeseg.pipelines.train import TrainRequest, train

    out = Path(paths.out)
    if out.exists() and any(out.iterdir()):
        if not run.overwrite:
            raise DDESegError(f"{out} is not empty; choose another --out")
        for name in ("raw", "shards", "audio", "bank", "run", "eval", "pictures", CONTROLS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    context = DistributedContext()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with _stage("synth", timings):
        raw = synth_covering_every_class(out / "raw", plan)
    with _stage("prepare", timings):
        prepared = prepare(
            config, PreparePaths(layout="ddeseg", root=raw, out=out / "shards", tasks=["v2"]), RunOptions(device=run.device, progress=run.progress)
        )
    with _stage("pretrain-audio", timings):
        audio_metrics = pretrain_audio(
            config, PretrainAudioPaths(out / "shards", out / "audio"), RunOptions(device=context.device, progress=run.progress)
        )
    with _stage("build-memory-bank", timings):
        build_memory_bank(
            config, MemoryBankPaths(out / "shards", out / "bank", audio_checkpoint=out / "audio" / "audio.pt"),
            RunOptions(device=run.device, progress=run.progress),
        )
    with _stage("train", timings):
        train_summary = train(
            config,
            TrainRequest(
                shards_dir=out / "shards", memory_bank=out / "bank" / "bank.npy", out_dir=out / "run",
                init_checkpoints=(out / "audio" / "audio.pt",),
            ),
            context,
        )
    with _stage("evaluate", timings):
        results, collectors = _evaluate_with_controls(out, plan, context, run)
    timings["total"] = time.perf_counter() - started

    report = dict(results["none"])
    report["controls"] = {
        control: {key: results[control][key] for key in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore") if key in results[control]}
        for control in CONTROLS
    }
    report["demo"] = {
        "plan": asdict(plan),
        "timings_s": timings,
        "audio_classifier": audio_metrics,
        "train": {k: v for k, v in train_summary.items() if k != "run_dir"},
        "prepared": {"counts": prepared.counts, "rejects": len(prepared.rejects)},
        "machine": machine_description(),
    }
    report["controls_pictures"] = write_controls_pictures(out, collectors, task_class_names(results["none"]))
    (out / "eval.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=float))
    write_stage_config(config, out)
    write_report(out, report)  # last: it links to the files above
    _print_summary(out, report)
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def eval_dir(control: str) -> str:
    """The evaluation folder of an audio condition, named as the report names it: `eval/normal`
    (`eval.audio_control: none`), `eval/shuffled`, `eval/silent`."""
    from ddeseg.visualize import audio_label

    return f"eval/{audio_label(control)}"


def machine_description() -> dict[str, Any]:
    """What the demo's numbers depend on besides the seed: on one machine they repeat bit for
    bit, but another thread count or CPU instruction set rounds the kernels differently, and 600
    training steps carry that into the scores (README, "Start here")."""
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": platform.processor() or platform.machine(),
    }


def task_class_names(report: dict[str, Any]) -> list[str]:
    """Class names by task id, from an eval.json dict's `per_class` (every class has an entry)."""
    by_id = {int(entry["id"]): name for name, entry in report["per_class"].items()}
    return [by_id.get(k, f"class_{k}") for k in range(max(by_id) + 1)]


def write_controls_pictures(out: Path, collectors: dict[str, PictureCollector], class_names: list[str]) -> list[dict[str, Any]]:
    """`out/pictures/controls/{i}-{key}.png` per frame the normal evaluation chose: the frame
    under the three audio conditions side by side (`ddeseg.visualize.controls_picture`). Returns
    eval.json's `controls_pictures`: per frame its key, why it was chosen, each condition's frame
    IoU and the picture's path."""
    from ddeseg.visualize import audio_label, controls_picture, save_png

    shutil.rmtree(out / CONTROLS_DIR, ignore_errors=True)
    by_control = {control: {frame.key: frame for _, frame in collector.chosen_frames()} for control, collector in collectors.items()}
    written = []
    for i, (why, frame) in enumerate(collectors["none"].chosen_frames()):
        frames = {control: chosen[frame.key] for control, chosen in by_control.items() if frame.key in chosen}
        where = f"video {frame.video}, frame {frame.frame}" if frame.video is not None else frame.key
        ious = ", ".join(f"{audio_label(c)} {f.score:.3f}" for c, f in frames.items())
        title = f"{i + 1}. {why} (by frame IoU with normal audio): {where}   |   IoU {ious}"
        name = f"{CONTROLS_DIR}/{i:02d}-{frame.key}.png"
        save_png(controls_picture(frames, class_names, title=title), out / name)
        written.append({
            "key": frame.key, "why": why, "video": frame.video, "frame": frame.frame, "picture": name,
            "iou": {audio_label(c): (f.score if math.isfinite(f.score) else None) for c, f in frames.items()},
        })
    return written


def plot_losses(metrics_path: Path, png_path: Path) -> Path:
    """Training loss (and its parts) and validation mIoU against step, as a PNG."""
    from ddeseg.report import plot_training_curves

    return plot_training_curves(metrics_path, png_path)


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Header and one row per audio given to the model: normal, then each control."""
    rows: list[tuple[str, ...]] = [("audio", "mIoU (DDESeg)", "F-score (DDESeg)", "mIoU (AVSBench)", "mIoU change")]
    entries = {"normal": report, **report["controls"]}
    for name, entry in entries.items():
        change = "–" if name == "normal" else f"{entry['miou'] - report['miou']:+.4f}"
        rows.append((name, _fmt(entry["miou"]), _fmt(entry["fscore"]), _fmt(entry.get("avsbench_miou")), change))
    return rows


def write_report(out: Path, report: dict[str, Any]) -> None:
    """`report.md` and `report.html` from the same data (`ddeseg.report`), with `loss.png` and
    `pictures/` beside them: the folder can be copied whole."""
    from ddeseg.report import Figure, Link, Report, Section, Table, evaluation_sections, overall_table
    from ddeseg.report import write_report as write_pages

    plot_losses(out / "run" / "metrics.jsonl", out / "loss.png")
    pictures_dir = out / "pictures"
    shutil.rmtree(pictures_dir, ignore_errors=True)
    source = out / eval_dir("none") / "pictures"
    if source.is_dir():
        shutil.copytree(source, pictures_dir)  # same relative paths as in eval/normal/eval.json
    demo = report["demo"]
    audio = demo["audio_classifier"]
    rows = _metric_rows(report)
    controls = Table(
        "The test frames with their own audio (normal) and with other audio (controls)",
        list(rows[0]),
        [list(row) for row in rows[1:]],
        note="shuffled: each frame hears another frame's second of audio; silent: the log-mel of silence. "
        "The drop from normal is how much the model relies on what it hears.",
    )
    timing_text = ", ".join(f"{k} {v:.0f} s" for k, v in demo["timings_s"].items())
    machine = demo.get("machine")
    machine_text = (
        f" Machine: torch {machine['torch']}, {machine['threads']} threads, {machine['cpu_capability']} kernels"
        " (the scores repeat exactly with the same thread count and kernels; with others they differ)."
        if machine else ""
    )
    intro = [
        f"Synthetic v2-style set: {demo['plan']['videos']} videos, {demo['plan']['classes']} sounding classes; "
        f"DDESeg (configs/demo.yaml) trained {demo['train']['steps']} steps; scored on the test split with the "
        "checkpoint chosen on val.",
        f"Audio classifier (pretrain-audio, {audio['split']}): single-source top-1 {audio['single_source_top1']:.3f}, "
        f"micro-F1 {audio['micro_f1']:.3f}. Time: {timing_text}.{machine_text}",
    ]
    compared = report.get("controls_pictures") or []
    sections = evaluation_sections(report, frames=not compared)
    training = Section(
        "Training",
        ["Training loss (and its parts) and the validation mIoU of each checkpoint evaluation."],
        figures=[Figure("loss.png", "training loss and val mIoU against step")],
    )
    frames = Section(
        "Frames under the three audio conditions",
        [
            "The same test frames scored with their own audio (normal), another frame's (shuffled) and silence."
            " Chosen across videos (one per video) by frame IoU with normal audio: the best, the nearest to the"
            f" median ({_fmt3(report.get('frame_iou_median'))}), the worst, and a few at random (seed {demo['plan']['seed']})."
            " Each picture: image | ground truth | prediction with normal | shuffled | silent audio, each with its"
            " frame IoU and the classes it painted; beneath each prediction, the log-mel it was given."
        ],
        figures=[Figure(c["picture"], _compared_caption(c)) for c in compared],
    )
    sections = [
        Section("Audio controls", tables=[controls, overall_table(report)]),
        *([frames] if compared else []),
        training,
        *sections,
        Section("Files", links=[Link(path, text) for path, text in DEMO_FILES if path == "report.md" or (out / path).exists()]),
    ]
    write_pages(Report("ddeseg demo report", intro, sections), out, "report")


DEMO_FILES = (
    ("eval.json", "the numbers of this page: the normal evaluation, the controls, timings, the demo plan"),
    ("report.md", "this page as Markdown"),
    ("config.yaml", "the resolved config of the demo (every stage folder holds its own)"),
    ("eval/normal/eval.html", "the evaluation with normal audio (its own eval.json, eval.md, config.yaml, pictures/)"),
    ("eval/shuffled/eval.html", "the evaluation with shuffled audio"),
    ("eval/silent/eval.html", "the evaluation with silent audio"),
    ("eval/normal/eval.json", "normal: every number"),
    ("eval/shuffled/eval.json", "shuffled: every number"),
    ("eval/silent/eval.json", "silent: every number"),
    ("run/config.yaml", "the training run's config"),
    ("run/metrics.jsonl", "the training log (loss per logged step, val mIoU)"),
    ("controls/", "the pictures of the frames under the three audio conditions"),
)


def _fmt3(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def _compared_caption(entry: dict[str, Any]) -> str:
    where = f" (video {entry['video']}, frame {entry['frame']})" if entry.get("video") is not None else ""
    ious = ", ".join(f"{name} {_fmt3(value)}" for name, value in entry["iou"].items())
    return f"{entry['why']}: {entry['key']}{where}; frame IoU {ious}"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _print_summary(out: Path, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="ddeseg demo: test split")
    for column in _metric_rows(report)[0]:
        table.add_column(column)
    for row in _metric_rows(report)[1:]:
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {out / 'report.html'} (and report.md); metrics: {out / 'eval.json'}")
