"""Reports a person reads: `eval.md` / `eval.html` of `ddeseg evaluate` and the demo's
`report.md` / `report.html`.

A report is data (`Report`: intro paragraphs and `Section`s of paragraphs, `Table`s and
`Figure`s) rendered by two Jinja2 templates (`ddeseg/templates/report.{html,md}.j2`), so the HTML
and the Markdown always hold the same tables and every cell is escaped by the template engine
(HTML autoescaping; `|` escaped in Markdown cells). Figures are paths relative to the report's
folder, so the folder can be copied as a whole.

`evaluation_sections` turns an eval.json dict (`ddeseg.pipelines.evaluate`) into the sections both
reports share: overall scores, per class, the confusion summary and the pictures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from ddeseg.fileio import write_bytes_atomic
from ddeseg.visualize import audio_label

TEMPLATES_DIR = Path(__file__).with_name("templates")
CONFUSION_TOP = 3  # classes listed per ground-truth class in the confusion summary
FRAME_GRID_PX = 560  # a frame picture (3 panels of 192 px) is 584 px: two per row on a 1240 px page
WHY_CHOSEN = ("best", "median", "worst", "random")
AUDIO_MEANING = {
    "none": " (each frame with its own second of audio)",
    "shuffled": " (each frame hears another frame's second of audio)",
    "silent": " (each frame hears the log-mel of silence)",
}


@dataclass
class Table:
    """A table: `rows` of already formatted cells, one per column; `numeric` right-aligns columns."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    numeric: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: a row has {len(row)} cells for {len(self.columns)} columns")
        if not self.numeric:
            self.numeric = [False] + [True] * (len(self.columns) - 1)


@dataclass
class Figure:
    """A picture: `path` relative to the report's folder, shown full width and linked at full size."""

    path: str
    caption: str


@dataclass
class Link:
    """A link to a file of the report's folder (`path` relative to it) and what it holds."""

    path: str
    text: str


@dataclass
class Section:
    """A part of a report. `grid_px` > 0 lays the figures out in a grid of columns at least that
    many pixels wide (the pictures' own width, so their text is not scaled down); 0: one per row."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    grid_px: int = 0

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class Report:
    title: str
    intro: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


def _markdown_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _environment(autoescape: bool) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = _markdown_cell
    return environment


def render_html(report: Report) -> str:
    """The report as one HTML page (inline CSS; pictures by relative path)."""
    return _environment(autoescape=True).get_template("report.html.j2").render(report=report)


def render_markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown (the same tables and pictures as `render_html`)."""
    text = _environment(autoescape=False).get_template("report.md.j2").render(report=report)
    return text.rstrip("\n") + "\n"


def write_text(path: Path, text: str) -> Path:
    """Write through a temporary name and rename, so a reader never sees half a file."""
    write_bytes_atomic(path, text.encode())
    return path


def write_report(report: Report, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """`out_dir/{stem}.html` and `out_dir/{stem}.md`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(out_dir / f"{stem}.html", render_html(report)), write_text(out_dir / f"{stem}.md", render_markdown(report))


# --------------------------------------------------------------------------------------------
# Sections of an evaluation
# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """A score for a table: `–` for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def confusion_summary(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per ground-truth class (by name), the pixels the model painted as each *other* class,
    largest first, zeros left out. `confusion[g][p]`: pixels of ground truth g predicted as p."""
    def name(k: int) -> str:
        return class_names[k] if k < len(class_names) else f"class_{k}"

    summary: dict[str, dict[str, int]] = {}
    for g, row in enumerate(confusion):
        others = sorted(((int(n), p) for p, n in enumerate(row) if p != g and n), key=lambda item: (-item[0], item[1]))
        if others:
            summary[name(g)] = {name(p): n for n, p in others}
    return summary


def _per_class_table(report: dict[str, Any]) -> Table:
    rows = []
    for name, entry in sorted(report["per_class"].items(), key=lambda item: item[1].get("id", 0)):
        rows.append([
            str(entry.get("id", "")), name, fmt(entry.get("iou")), fmt(entry.get("fscore")),
            str(entry.get("target_pixels", "–")), str(entry.get("predicted_pixels", "–")),
            str(entry.get("target_frames", "–")),
        ])
    return Table(
        "Per class (DDESeg protocol)",
        ["id", "class", "IoU", "F-score", "GT pixels", "predicted pixels", "GT frames"],
        rows,
        note="–: the class is in neither the ground truth nor the prediction of any frame.",
        numeric=[True, False, True, True, True, True, True],
    )


def _confusion_table(report: dict[str, Any]) -> Table | None:
    confusion = report.get("confusion")
    if not isinstance(confusion, dict):
        return None
    rows = []
    for name, entry in sorted(report["per_class"].items(), key=lambda item: item[1].get("id", 0)):
        target = int(entry.get("target_pixels") or 0)
        if target == 0:
            continue
        instead = confusion.get(name, {})
        listed = [f"{other} {pixels} ({100.0 * pixels / target:.1f}%)" for other, pixels in list(instead.items())[:CONFUSION_TOP]]
        correct = int(entry.get("tp", target - sum(instead.values())))
        rows.append([name, str(target), f"{100.0 * correct / target:.1f}%", "; ".join(listed) or "nothing else"])
    return Table(
        "Confusion summary: what the model painted on each ground-truth class's pixels",
        ["ground-truth class", "GT pixels", "painted correctly", f"painted instead (top {CONFUSION_TOP}, pixels)"],
        rows,
        note="Percentages are of the class's ground-truth pixels; 'background' means the class was missed.",
        numeric=[False, True, True, False],
    )


def overall_table(report: dict[str, Any]) -> Table:
    """Both protocols' scores of one evaluation."""
    return Table(
        "Scores",
        ["protocol", "mIoU", "F-score (beta^2 = 0.3)", "F1"],
        [
            ["DDESeg (split-accumulated)", fmt(report["miou"]), fmt(report["fscore"]), fmt(report.get("f1"))],
            [str(report.get("avsbench_protocol", "AVSBench")), fmt(report.get("avsbench_miou")), fmt(report.get("avsbench_fscore")), "–"],
        ],
    )


def evaluation_sections(report: dict[str, Any], picture_prefix: str = "", frames: bool = True) -> list[Section]:
    """Per class, confusion and picture sections of an eval.json dict; picture paths get
    `picture_prefix` (where the evaluation's folder is, seen from the report). `frames=False`
    leaves out the chosen frames (the demo shows them under every audio condition instead)."""
    tables = [_per_class_table(report)]
    confusion = _confusion_table(report)
    if confusion is not None:
        tables.append(confusion)
    sections = [Section("Per class", tables=tables)]
    control = audio_label(str(report.get("audio_control", "none")))
    median = report.get("frame_iou_median")
    chosen = (
        "Frames chosen across videos (at most one per video while there are enough): the best and the worst by"
        f" frame IoU, the nearest to the median frame IoU of the split ({fmt(median, 3)}), and a few at random."
        if report.get("samples") and report["samples"][0].get("why") in WHY_CHOSEN else ""
    )
    galleries = [
        (
            "Frames",
            f"{chosen} Each picture: image | ground truth | prediction, the classes present with their share of the"
            " frame, and below, the second of audio the model was given (log-mel). Click a picture for full size.",
            [Figure(picture_prefix + s["picture"], _sample_caption(s, control)) for s in report.get("samples", [])],
            FRAME_GRID_PX,
        ),
        (
            "Videos",
            "Frames of one video left to right: ground truth, then prediction, then each frame's second of audio.",
            [Figure(picture_prefix + s["picture"], f"{s['label']} video {s['video']} (video IoU {fmt(s['iou'], 3)} of the videos drawn)")
             for s in report.get("video_strips", [])],
            0,
        ),
    ]
    if not frames:
        galleries = galleries[1:]
    sections += [Section(title, [text.strip()], figures=figures, grid_px=grid) for title, text, figures, grid in galleries if figures]
    worst = [p for p in report.get("pictures", []) if p.endswith("worst-frames.png")]
    if worst:
        keys = ", ".join(f"{w['key']} ({fmt(w['iou'], 3)})" for w in report.get("worst_frames", []))
        sections.append(Section("Worst frames", [f"By frame IoU: {keys}."], figures=[Figure(picture_prefix + worst[0], "worst frames")]))
    return sections


def _sample_caption(sample: dict[str, Any], control: str) -> str:
    why = f"{sample['why']}: " if sample.get("why") else ""
    where = f" (video {sample['video']}, frame {sample['frame']})" if sample.get("video") is not None else ""
    return f"{why}{sample['key']}{where}, frame IoU {fmt(sample['iou'], 3)}, audio: {control}"


EVALUATION_FILES = (
    ("eval.json", "every number of this page, per class, the confusion summary and the pictures drawn"),
    ("eval.md", "this page as Markdown"),
    ("config.yaml", "the resolved config of this evaluation"),
    ("pictures/", "the pictures, full size"),
)


def evaluation_report(report: dict[str, Any]) -> Report:
    """The eval.md / eval.html of `ddeseg evaluate`."""
    counts = report["counts"]
    intro = [
        f"Checkpoint {report['checkpoint']} ({report['checkpoint_format']}, step {report['checkpoint_step']}); "
        f"memory bank {report['memory_bank']}; audio: {audio_label(str(report['audio_control']))}"
        f"{AUDIO_MEANING.get(str(report['audio_control']), '')}.",
        f"Frames: {counts['frames']} (manifest: {counts['frames_in_manifest']}, skipped: {counts['skipped_samples']}); "
        f"classes evaluated: {counts['classes_evaluated']} of {report['num_classes']}.",
    ]
    drawn = bool(report.get("pictures"))  # no pictures/ folder when none were asked for
    files = Section("Files", links=[Link(path, text) for path, text in EVALUATION_FILES if drawn or path != "pictures/"])
    sections = [Section("Scores", tables=[overall_table(report)]), *evaluation_sections(report), files]
    return Report(f"Evaluation: {report['task']} / {report['split']}", intro, sections)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def plot_training_curves(metrics_path: Path, png_path: Path) -> Path:
    """Training loss (and its parts) and validation mIoU against step, from a run's
    metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r and "split" not in r]
    val_records = [r for r in records if r.get("split") == "val"]
    figure, loss_axis = plt.subplots(figsize=(9, 3.8), dpi=110)
    steps = [r["step"] for r in train_records]
    marker = "o" if len(steps) < 20 else None  # a line of one or two points is invisible without markers
    loss_axis.plot(steps, [r["loss"] for r in train_records], label="loss", color="black", marker=marker)
    for part in sorted({k for r in train_records for k in r if k.endswith("_loss")}):
        loss_axis.plot(steps, [r.get(part, float("nan")) for r in train_records], label=part, linewidth=0.8, marker=marker)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    loss_axis.grid(alpha=0.3)
    handles, labels = loss_axis.get_legend_handles_labels()
    if val_records:
        miou_axis = loss_axis.twinx()
        miou_axis.plot([r["step"] for r in val_records], [r["miou"] for r in val_records], "o-", color="tab:purple", label="val mIoU")
        miou_axis.set_ylabel("val mIoU")
        miou_axis.set_ylim(0, 1)
        more_handles, more_labels = miou_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # One legend above the plot: inside it, it covered the start of the loss curve.
    loss_axis.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels), fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
