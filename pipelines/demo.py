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
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddeseg.config import Config, load_config, resolve_config_path
from ddeseg.errors import DDESegError
from ddeseg.progress import console

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
    from ddeseg.pipelines.sources.synthetic import generate

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
    """configs/demo.yaml with the class counts of the synthetic set and the plan's steps."""
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
            *plan.overrides,
        ],
    )


def run_demo(out: Path, plan: DemoPlan, config_path: str | Path = "demo", overwrite: bool = True) -> dict[str, Any]:
    """Run every stage into `out`; return the demo's eval.json dict (metrics + controls)."""
    from ddeseg.distributed import DistributedContext
    from ddeseg.engine.evaluate import EvaluateRequest, run_evaluation
    from ddeseg.engine.pretrain_audio import pretrain_audio
    from ddeseg.engine.train import TrainRequest, train
    from ddeseg.pipelines.memory_bank import build_memory_bank
    from ddeseg.pipelines.prepare import PrepareOptions, prepare

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DDESegError(f"{out} is not empty; choose another --out")
        for name in ("raw", "shards", "audio", "bank", "run", "eval", "pictures"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(plan, config_path)
    context = DistributedContext()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with _stage("synth", timings):
        raw = synth_covering_every_class(out / "raw", plan)
    with _stage("prepare", timings):
        prepared = prepare(PrepareOptions(layout="ddeseg", root=raw, out=out / "shards", tasks=["v2"]), config)
    with _stage("pretrain-audio", timings):
        audio_metrics = pretrain_audio(config, out / "shards", out / "audio", context.device)
    with _stage("build-memory-bank", timings):
        build_memory_bank(
            out / "shards", out / "bank", k=plan.bank_k, config=config,
            audio_checkpoint=out / "audio" / "audio.pt", task="v2", seed=plan.seed,
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
            results[control] = run_evaluation(
                EvaluateRequest(
                    checkpoint=out / "run" / "best.pt", shards_dir=out / "shards", out_dir=out / "eval" / control,
                    split="test", audio_control=control, pictures=8 if control == "none" else 0,
                    worst_frames=8 if control == "none" else 0,
                ),
                context,
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
    write_report(out, report)
    _print_summary(out, report)
    return report


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def plot_losses(metrics_path: Path, png_path: Path) -> Path:
    """Training loss (and its parts) and validation mIoU against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r and "split" not in r]
    val_records = [r for r in records if r.get("split") == "val"]
    figure, loss_axis = plt.subplots(figsize=(7, 3.6), dpi=110)
    steps = [r["step"] for r in train_records]
    loss_axis.plot(steps, [r["loss"] for r in train_records], label="loss", color="black")
    for part in sorted({k for r in train_records for k in r if k.endswith("_loss")}):
        loss_axis.plot(steps, [r.get(part, float("nan")) for r in train_records], label=part, linewidth=0.8)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    loss_axis.legend(loc="upper left", fontsize=7)
    if val_records:
        miou_axis = loss_axis.twinx()
        miou_axis.plot([r["step"] for r in val_records], [r["miou"] for r in val_records], "o-", color="tab:green", label="val mIoU")
        miou_axis.set_ylabel("val mIoU")
        miou_axis.set_ylim(0, 1)
        miou_axis.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [("audio", "mIoU (DDESeg)", "F-score (DDESeg)", "mIoU (AVSBench)")]
    entries = {"normal": report, **report["controls"]}
    for name, entry in entries.items():
        rows.append(
            (name, f"{entry['miou']:.4f}", f"{entry['fscore']:.4f}", f"{entry['avsbench_miou']:.4f}" if "avsbench_miou" in entry else "-")
        )
    return rows


def write_report(out: Path, report: dict[str, Any]) -> None:
    """`report.md` and `report.html` (self-contained apart from the PNGs beside them)."""
    plot_losses(out / "run" / "metrics.jsonl", out / "loss.png")
    pictures_dir = out / "pictures"
    shutil.rmtree(pictures_dir, ignore_errors=True)
    source = out / "eval" / "none" / "pictures"
    pictures = []
    if source.is_dir():
        shutil.copytree(source, pictures_dir)
        pictures = sorted(p.relative_to(out).as_posix() for p in pictures_dir.glob("*.png"))
    demo = report["demo"]
    drop = {c: report["miou"] - report["controls"][c]["miou"] for c in CONTROLS}
    # eval.json keys per-class entries by class name, each with its task class `id`.
    per_class = sorted(report.get("per_class", {}).items(), key=lambda item: item[1].get("id", 0))
    timing_text = ", ".join(f"{k} {v:.0f}s" for k, v in demo["timings_s"].items())
    audio = demo["audio_classifier"]

    rows = _metric_rows(report)
    md = [
        "# ddeseg demo report",
        "",
        f"Synthetic v2-style set: {demo['plan']['videos']} videos, {demo['plan']['classes']} classes; "
        f"DDESeg ({'configs/demo.yaml'}) trained {demo['train']['steps']} steps; test split, best checkpoint chosen on val.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        f"Audio reliance: shuffling the audio costs {drop['shuffled']:.4f} mIoU, silence costs {drop['silent']:.4f}.",
        f"Audio classifier (pretrain-audio, {audio['split']}): single-source top-1 {audio['single_source_top1']:.3f}, micro-F1 {audio['micro_f1']:.3f}.",
        f"Time: {timing_text}.",
        "",
        "## Per class (DDESeg protocol)",
        "",
        "| class | IoU | F-score |",
        "|---|---|---|",
        *(
            f"| {entry.get('name', cid)} | {_fmt(entry.get('iou'))} | {_fmt(entry.get('fscore'))} |"
            for cid, entry in per_class
        ),
        "",
        "## Training",
        "",
        "![loss](loss.png)",
        "",
        "## Pictures (image | ground truth | prediction)",
        "",
        *(f"![{Path(p).stem}]({p})" for p in pictures),
        "",
    ]
    (out / "report.md").write_text("\n".join(md))

    def table(rows_: list[tuple[str, ...]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows_[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows_[1:])
        return f"<table><tr>{head}</tr>{body}</table>"

    class_rows = [("class", "IoU", "F-score")] + [
        (str(entry.get("name", cid)), _fmt(entry.get("iou")), _fmt(entry.get("fscore"))) for cid, entry in per_class
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ddeseg demo report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>ddeseg demo report</h1>
<p>{html.escape(md[2])}</p>
{table(rows)}
<p>{html.escape(md[8])}<br>{html.escape(md[9])}<br>{html.escape(md[10])}</p>
<h2>Per class (DDESeg protocol)</h2>{table(class_rows)}
<h2>Training</h2><img src="loss.png" alt="training loss">
<h2>Pictures (image | ground truth | prediction)</h2>
{''.join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in pictures)}
</body></html>
"""
    (out / "report.html").write_text(page)


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
