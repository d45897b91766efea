"""Reports: the confusion counts of `SegmentationMeter`, the confusion summary, and the HTML /
Markdown of a tiny evaluation and of the demo, read back with the standard library's HTML parser:
every table has all its rows, no table row is left as raw `| a | b |` text, every picture exists."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddeseg.metrics import SegmentationMeter
from ddeseg.picture_choice import PictureCollector
from ddeseg.pipelines.demo import write_report
from ddeseg.pipelines.evaluate import write_outputs
from ddeseg.report import confusion_summary
from ddeseg.scoring import class_entries

NAMES = ["background", "alpha", "bravo", "charlie"]
SIZE = 16


# --------------------------------------------------------------------------------------------
# Confusion counts
# --------------------------------------------------------------------------------------------


def test_meter_counts_confusion_and_frames_holding_each_class():
    meter = SegmentationMeter(3)
    target = torch.tensor([[[0, 1, 1], [2, 2, 255]], [[0, 0, 0], [0, 0, 0]]])
    pred = torch.tensor([[[0, 1, 2], [2, 0, 1]], [[0, 0, 1], [0, 0, 0]]])
    meter.update(pred, target)
    result = meter.compute()
    # rows: ground truth, columns: prediction; the ignored pixel (255) is in no cell
    assert result["confusion"] == [[6, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert [result["per_class"][k]["target_frames"] for k in range(3)] == [2, 1, 1]
    # the diagonal is each class's true positives, a row sums to its ground-truth pixels
    for k in range(3):
        assert result["confusion"][k][k] == result["per_class"][k]["tp"]
        assert sum(result["confusion"][k]) == result["per_class"][k]["target_pixels"]


def test_confusion_summary_lists_other_classes_largest_first():
    confusion = [[6, 1, 0], [0, 1, 1], [3, 0, 1], [0, 0, 0]]
    summary = confusion_summary(confusion, ["bg", "a", "b", "c"])
    assert summary == {"bg": {"a": 1}, "a": {"b": 1}, "b": {"bg": 3}}


# --------------------------------------------------------------------------------------------
# Reading HTML back
# --------------------------------------------------------------------------------------------


class PageReader(HTMLParser):
    """Tables (caption, header, body rows), image sources, link targets and the text that is not
    inside any table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.grid_images: list[str] = []  # images inside a <div class="grid">
        self.sections: dict[str, list[str]] = {}  # h2 title -> the images under it
        self._div_grid: list[bool] = []
        self._in_h2 = False
        self._h2 = ""
        self.links: list[str] = []
        self.loose_text: list[str] = []
        self._table: dict | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_caption = False
        self._in_head = False
        self._header_cells = 0
        self._skip = 0  # inside <style> / <title>

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("style", "title"):
            self._skip += 1
        elif tag == "table":
            self._table = {"caption": "", "header": [], "rows": []}
        elif tag == "caption":
            self._in_caption = True
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr":
            self._row, self._header_cells = [], 0
        elif tag in ("td", "th"):
            self._cell = []
            self._header_cells += tag == "th"
        elif tag == "div":
            self._div_grid.append("grid" in (attrs.get("class") or "").split())
        elif tag == "h2":
            self._in_h2, self._h2 = True, ""
        elif tag == "img":
            self.images.append(attrs["src"])
            if any(self._div_grid):
                self.grid_images.append(attrs["src"])
            self.sections.setdefault(self._h2, []).append(attrs["src"])
        elif tag == "a" and not attrs.get("href", "#").startswith("#"):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "div":
            self._div_grid.pop()
        elif tag == "h2":
            self._in_h2 = False
            self.sections.setdefault(self._h2, [])
        if tag in ("style", "title"):
            self._skip -= 1
        elif tag == "table":
            self.tables.append(self._table)
            self._table = None
        elif tag == "caption":
            self._in_caption = False
        elif tag == "thead":
            self._in_head = False
        elif tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            if self._in_head or (not self._table["header"] and self._header_cells == len(self._row)):
                self._table["header"] = self._row
            else:
                self._table["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_h2:
            self._h2 += data
        if self._skip:
            return
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_caption:
            self._table["caption"] += data
        elif self._table is None and data.strip():
            self.loose_text.append(data.strip())


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    reader.feed(path.read_text())
    reader.close()
    return reader


def table_problems(reader: PageReader, folder: Path) -> list[str]:
    """What is wrong with a page: a Markdown table row outside the tables, a row with a wrong
    number of cells, an image or link to a missing file."""
    problems = [f"raw table text: {text!r}" for text in reader.loose_text if text.startswith("|")]
    for table in reader.tables:
        problems += [f"{table['caption']}: row {row}" for row in table["rows"] if len(row) != len(table["header"])]
    problems += [
        f"missing {src}" for src in reader.images + reader.links
        if not ((folder / src).is_dir() if src.endswith("/") else (folder / src).is_file())
    ]
    return problems


def rows_of(reader: PageReader, caption_start: str) -> list[list[str]]:
    matches = [t for t in reader.tables if t["caption"].startswith(caption_start)]
    assert len(matches) == 1, [t["caption"] for t in reader.tables]
    return matches[0]["rows"]


def test_the_page_check_catches_a_table_row_printed_as_text(tmp_path):
    # What the old hand-written converter made of the demo's first table: its last row as text.
    page = tmp_path / "old.html"
    page.write_text(
        "<html><body><table><tr><th>audio</th><th>mIoU</th></tr><tr><td>normal</td><td>0.2</td></tr>"
        "<tr><td>shuffled</td><td>0.1</td></tr></table><p>| silent | 0.1061 | 0.2 |</p>"
        '<img src="pictures/gone.png"></body></html>'
    )
    assert table_problems(read_page(page), tmp_path) == ["raw table text: '| silent | 0.1061 | 0.2 |'", "missing pictures/gone.png"]


# --------------------------------------------------------------------------------------------
# A tiny evaluation, then the demo's report on top of it
# --------------------------------------------------------------------------------------------


def tiny_evaluation(out: Path, control: str = "none", keep: dict[str, str] | None = None) -> tuple[dict, PictureCollector]:
    """Two videos of three frames through the real meter, collector and `write_outputs` (and the
    config.yaml that `run_evaluation` writes first). `silent`: the model paints nothing."""
    rng = np.random.default_rng(0)
    meter = SegmentationMeter(len(NAMES))
    collector = PictureCollector(samples=3, worst=2, videos=4, keep=keep)
    for video in ("vid_a", "vid_b"):
        target = torch.zeros(3, SIZE, SIZE, dtype=torch.long)
        target[:, 2:8, 2:8] = 1
        target[:, 9:14, 6:15] = 2
        pred = target.clone()
        pred[:, 9:14, 6:10] = 3 if video == "vid_b" else 2  # vid_b paints part of bravo as charlie
        pred[0, 2:8, 2:8] = 0  # the first frame misses alpha
        if control == "silent":
            pred[:] = 0
        scores = meter.update(pred, target)
        collector.add(
            [f"v2-{video}-{i:03d}" for i in range(3)], torch.from_numpy(rng.normal(size=(3, 3, SIZE, SIZE))).float(),
            target, pred, scores, logmels=torch.from_numpy(rng.normal(-40, 10, size=(3, 1, 20, 8))).float(),
            sounding=[[1, 2]] * 3, videos=[video] * 3, frames=torch.arange(3),
        )
    result = meter.compute()
    per_class = class_entries(result["per_class"], NAMES)
    report = {
        **{k: result[k] for k in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore")},
        "avsbench_protocol": "AVSBench AVSS (semantic, per frame)",
        "per_class": {e["name"]: {"id": k, **{n: v for n, v in e.items() if n != "name"}} for k, e in per_class.items()},
        "confusion": result["confusion"],
        "task": "v2", "split": "test", "binary": False, "num_classes": len(NAMES),
        "checkpoint": "run/best.pt", "checkpoint_format": "ddeseg", "checkpoint_step": 7, "memory_bank": "checkpoint",
        "audio_control": control, "audio_control_unchanged_frames": 0,
        "counts": {"frames": 6, "frames_in_manifest": 6, "pixels": 6 * SIZE * SIZE, "classes_evaluated": 4,
                   "skipped_samples": 0, "world_size": 1},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("task: v2\n")
    write_outputs(report, collector, out, NAMES)
    return report, collector


def test_evaluation_report_has_every_table_row_and_picture(tmp_path):
    report, _ = tiny_evaluation(tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["confusion"] == {
        "alpha": {"background": 2 * 6 * 6},  # the first frame of each video misses alpha's 6x6 block
        "bravo": {"charlie": 3 * 5 * 4},  # vid_b paints 5x4 of bravo's 5x9 block as charlie
    }
    page = read_page(tmp_path / "eval.html")
    assert table_problems(page, tmp_path) == []
    assert [row[1] for row in rows_of(page, "Per class")] == NAMES
    assert rows_of(page, "Per class")[1][4:] == ["216", "144", "6"]  # alpha: GT pixels (6 x 36), predicted (4 x 36), GT frames
    confusion = rows_of(page, "Confusion")
    assert [row[0] for row in confusion] == NAMES[:3]  # charlie is in no ground truth
    assert confusion[1][3] == "background 72 (33.3%)" and confusion[2][3] == "charlie 60 (22.2%)"
    assert len(rows_of(page, "Scores")) == 2
    # 3 sample frames, 2 video strips (best and worst of two; the median is the best), the worst sheet
    assert len(report["samples"]) == 3 and [s["label"] for s in report["video_strips"]] == ["best", "worst"]
    files = ["eval.json", "eval.md", "config.yaml", "pictures/"]
    assert sorted(page.images) == sorted(report["pictures"]) and sorted(page.links) == sorted(report["pictures"] + files)
    # the chosen frames in a grid (two per row on the page), every other picture full width
    assert page.grid_images == [s["picture"] for s in report["samples"]]
    assert [s["why"] for s in report["samples"]] == ["best", "median", "worst"]
    assert {s["video"] for s in report["samples"]} == {"vid_a", "vid_b"}  # across videos
    markdown = (tmp_path / "eval.md").read_text()
    assert "| 2 | bravo |" in markdown and "| DDESeg (split-accumulated) |" in markdown
    assert all("![" in markdown and f"]({p})" in markdown for p in report["pictures"])


def test_demo_report_has_all_control_rows_curves_and_pictures(tmp_path):
    from ddeseg.pipelines.demo import write_controls_pictures

    out = tmp_path / "demo"
    report, normal = tiny_evaluation(out / "eval" / "normal")
    chosen = {s["key"]: s["why"] for s in report["samples"]}
    collectors = {"none": normal}
    for control in ("shuffled", "silent"):
        collectors[control] = tiny_evaluation(out / "eval" / control, control, keep=chosen)[1]
    report["controls_pictures"] = write_controls_pictures(out, collectors, NAMES)
    (out / "run").mkdir(parents=True)
    records = [{"step": s, "loss": 1.0 / s, "mask_loss": 0.5 / s} for s in range(1, 6)] + [{"step": 5, "split": "val", "miou": 0.4}]
    (out / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report["controls"] = {"shuffled": {"miou": 0.2, "fscore": 0.3, "avsbench_miou": 0.1},
                          "silent": {"miou": 0.1061, "fscore": 0.2, "avsbench_miou": 0.05}}
    report["demo"] = {
        "plan": {"videos": 2, "classes": 3, "seed": 0}, "train": {"steps": 5}, "timings_s": {"train": 1.0, "total": 2.0},
        "audio_classifier": {"split": "val", "single_source_top1": 0.5, "micro_f1": 0.4},
    }
    write_report(out, report)
    page = read_page(out / "report.html")
    assert table_problems(page, out) == []
    controls = rows_of(page, "The test frames")
    assert [row[0] for row in controls] == ["normal", "shuffled", "silent"]
    assert controls[2][1] == "0.1061" and controls[2][4] == f"{0.1061 - report['miou']:+.4f}"
    assert "loss.png" in page.images and len(rows_of(page, "Per class")) == len(NAMES)
    # the normal evaluation's chosen frames are shown once, each under the three audio conditions
    compared = page.sections["Frames under the three audio conditions"]
    assert compared == [c["picture"] for c in report["controls_pictures"]] and len(compared) == 3
    assert [c["key"] for c in report["controls_pictures"]] == list(chosen)
    for entry in report["controls_pictures"]:
        assert list(entry["iou"]) == ["normal", "shuffled", "silent"] and entry["iou"]["silent"] < entry["iou"]["normal"]
        with Image.open(out / entry["picture"]) as picture:
            assert picture.width == 5 * 192 + 4 * 4  # image | ground truth | normal | shuffled | silent
    assert not any(p.startswith("pictures/sample-") for p in page.images)  # not twice
    assert {"eval/normal/eval.html", "eval/shuffled/eval.html", "eval/silent/eval.html", "eval/silent/eval.json"} <= set(page.links)
    assert "none" not in " ".join(page.loose_text) + " ".join(page.links)  # "normal", never "none"
    markdown = (out / "report.md").read_text()
    assert markdown.count("| silent | 0.1061 |") == 1 and "![" in markdown


@pytest.mark.parametrize("cell", ["a|b", "<b>x</b>"])
def test_cells_are_escaped_in_both_formats(tmp_path, cell):
    from ddeseg.report import Report, Section, Table, render_html, render_markdown

    report = Report("t", sections=[Section("s", tables=[Table("tab", ["class", "IoU"], [[cell, "1.0"]])])])
    page = tmp_path / "p.html"
    page.write_text(render_html(report))
    assert rows_of(read_page(page), "tab") == [[cell, "1.0"]]
    row = [line for line in render_markdown(report).splitlines() if "1.0" in line][0]
    assert row.count(" | ") == 1  # the cell's own | is escaped, not a column separator
