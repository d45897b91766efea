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
    DIR/eval/{none,shuffled,silent}/   evaluate outputs
    DIR/eval.json, DIR/report.md, DIR/report.html, DIR/loss.png, DIR/pictures/
    DIR/config.yaml   the resolved config (every stage folder holds its own too)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddeseg.config import Config, load_config, resolve_config_path
from ddeseg.errors import DDESegError
from ddeseg.progress import console
from ddeseg.stage import ConfigSource, RunOptions, write_stage_config

CONTROLS = ("shuffled", "silent")


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


def run_demo(
    config: Config, paths: DemoPaths, plan: DemoPlan, run: RunOptions = RunOptions(overwrite=True)
) -> dict[str, Any]:
    """Run every stage into `paths.out` with `config` (`demo_config(plan, ...)`: every stage's
    section of it) and the sizes of `plan`; return the demo's eval.json dict (metrics + controls).
    `run.overwrite` (the default) replaces an earlier demo's folders in `out`; training and the
    audio pretraining run on the CPU (the demo's numbers are the same on any machine)."""
    from ddeseg.distributed import DistributedContext
    from ddeseg.pipelines.build_memory_bank import MemoryBankPaths, build_memory_bank
    from ddeseg.pipelines.evaluate import EvaluatePaths, run_evaluation
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.pipelines.pretrain_audio import PretrainAudioPaths, pretrain_audio
    from ddeseg.pipelines.train import TrainRequest, train

    out = Path(paths.out)
    if out.exists() and any(out.iterdir()):
        if not run.overwrite:
            raise DDESegError(f"{out} is not empty; choose another --out")
        for name in ("raw", "shards", "audio", "bank", "run", "eval", "pictures"):
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
            config, PretrainAudioPaths(out / "shards", out / "audio"), RunOptions(device=str(context.device), progress=run.progress)
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
    results: dict[str, dict[str, Any]] = {}
    with _stage("evaluate", timings):
        # best.pt is chosen on the val split; the test split is only scored here.
        for control in ("none", *CONTROLS):
            drawn = 8 if control == "none" else 0
            settings = ("eval.split=test", f"eval.audio_control={control}", f"eval.pictures={drawn}", f"eval.worst_frames={drawn}")
            results[control] = run_evaluation(
                ConfigSource(overrides=settings),  # the config stored in best.pt: the demo's
                EvaluatePaths(checkpoint=out / "run" / "best.pt", shards=out / "shards", out=out / "eval" / control),
                context,
                progress=run.progress,
            )
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
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=float))
    write_stage_config(config, out)
    write_report(out, report)
    _print_summary(out, report)
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


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
    from ddeseg.report import Figure, Report, Section, Table, evaluation_sections, overall_table
    from ddeseg.report import write_report as write_pages

    plot_losses(out / "run" / "metrics.jsonl", out / "loss.png")
    pictures_dir = out / "pictures"
    shutil.rmtree(pictures_dir, ignore_errors=True)
    source = out / "eval" / "none" / "pictures"
    if source.is_dir():
        shutil.copytree(source, pictures_dir)  # same relative paths as in eval/none/eval.json
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
    intro = [
        f"Synthetic v2-style set: {demo['plan']['videos']} videos, {demo['plan']['classes']} sounding classes; "
        f"DDESeg (configs/demo.yaml) trained {demo['train']['steps']} steps; scored on the test split with the "
        "checkpoint chosen on val.",
        f"Audio classifier (pretrain-audio, {audio['split']}): single-source top-1 {audio['single_source_top1']:.3f}, "
        f"micro-F1 {audio['micro_f1']:.3f}. Time: {timing_text}.",
    ]
    sections = evaluation_sections(report)
    training = Section(
        "Training",
        ["Training loss (and its parts) and the validation mIoU of each checkpoint evaluation."],
        figures=[Figure("loss.png", "training loss and val mIoU against step")],
    )
    sections = [Section("Audio controls", tables=[controls, overall_table(report)]), training, *sections]
    write_pages(Report("ddeseg demo report", intro, sections), out, "report")


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
