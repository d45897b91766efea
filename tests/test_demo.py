"""`ddeseg demo` end to end at minimal size: every stage runs, the report is written, and the
numbers are finite and above what predicting background everywhere would score."""

from __future__ import annotations

import json
import math

from PIL import Image

from ddeseg.pipelines.demo import DemoPaths, DemoPlan, demo_config, run_demo
from ddeseg.visualize import controls_layout, frame_layout


def _all_background_miou(per_class: dict) -> float:
    """DDESeg-protocol mIoU of a model that predicts background everywhere: background scores
    its pixel share, every class present in the ground truth scores 0."""
    total = sum(entry["target_pixels"] for entry in per_class.values())
    present = [entry for entry in per_class.values() if entry["target_pixels"] > 0]
    background = next(entry for entry in per_class.values() if entry["id"] == 0)
    return background["target_pixels"] / total / len(present)


def test_demo_runs_every_stage_and_reports(tmp_path, micro_config_overrides):
    plan = DemoPlan(
        videos=10, classes=2, image_size=64, pretrain_steps=20, train_steps=40, bank_k=4,
        overrides=micro_config_overrides + ["train.base_lr=2e-3", "data.batch_size=8"],
    )
    out = tmp_path / "demo"
    report = run_demo(demo_config(plan), DemoPaths(out), plan)

    for name in ("report.md", "report.html", "eval.json", "loss.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["miou"] == report["miou"]
    for control in ("shuffled", "silent"):
        assert math.isfinite(on_disk["controls"][control]["miou"])
    assert all(math.isfinite(on_disk[key]) for key in ("miou", "fscore", "avsbench_miou"))
    assert on_disk["miou"] > _all_background_miou(on_disk["per_class"])
    assert on_disk["split"] == "test" and on_disk["checkpoint"].endswith("best.pt")

    html = (out / "report.html").read_text()
    assert "loss.png" in html and "shuffled" in html and "silent" in html
    # the frames the normal evaluation chose, each drawn under the three audio conditions
    chosen = [s["key"] for s in on_disk["samples"]]
    assert chosen and [c["key"] for c in on_disk["controls_pictures"]] == chosen
    for control in ("shuffled", "silent"):  # the controls kept the same frames
        kept = json.loads((out / "eval" / control / "eval.json").read_text())["samples"]
        assert [s["key"] for s in kept] == chosen and all(s["why"] for s in kept)
    for entry in on_disk["controls_pictures"]:
        assert entry["picture"] in html and list(entry["iou"]) == ["normal", "shuffled", "silent"]
        with Image.open(out / entry["picture"]) as picture:
            layout = controls_layout(32)  # image | ground truth | 3 predictions, each upscaled to 192 px, audio below
            assert picture.size == (layout.width, layout.height) and layout.panel == 192
    pictures = sorted((out / "eval" / "normal" / "pictures").glob("sample-*.png"))
    with Image.open(pictures[0]) as picture:
        assert picture.size == (frame_layout(32).width, frame_layout(32).height)
    assert on_disk["demo"]["machine"]["threads"] >= 1
    assert set(on_disk["demo"]["timings_s"]) >= {"synth", "prepare", "pretrain-audio", "build-memory-bank", "train", "evaluate"}

    # every output folder holds the resolved config that made it
    from ddeseg.config import load_config

    configs = {name: load_config(out / name / "config.yaml") for name in ("", "shards", "audio", "bank", "run", "eval/normal", "eval/shuffled")}
    assert configs[""] == configs["shards"] == configs["bank"] and configs[""].memory_bank.k == plan.bank_k == 4
    assert configs["run"].train.steps == 40 and configs["audio"].pretrain_audio.steps == 20
    assert (configs["eval/normal"].eval.pictures, configs["eval/shuffled"].eval.pictures) == (8, 8)
    assert configs["eval/shuffled"].eval.audio_control == "shuffled" and configs["eval/normal"].eval.split == "test"
