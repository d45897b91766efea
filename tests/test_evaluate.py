"""Evaluation: palette and pictures, audio-reliance controls, `evaluate_model` against meters fed by
hand, and `ddeseg evaluate` end to end (in one process and under torchrun) on tiny shards written
here with `webdataset.TarWriter` and the schema encoders."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from webdataset import TarWriter

from ddeseg.audio_controls import AudioControl, silent_logmel
from ddeseg.classes import avss_palette
from ddeseg.cli.app import app
from ddeseg.config import Config, load_config, to_dict
from ddeseg.data import schema
from ddeseg.data.stream import make_eval_loader
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.metrics import AVSBenchBinaryMeter, SegmentationMeter, foreground_logits, predicted_labels
from ddeseg.models import build_model
from ddeseg.picture_choice import PictureCollector
from ddeseg.scoring import evaluate_model, video_frame_ids
from ddeseg.training.checkpoint import FORMAT, atomic_torch_save
from ddeseg.visualize import (
    FramePicture,
    colorize,
    contact_sheet,
    denormalize_images,
    frame_layout,
    frame_picture,
    overlay,
    sheet_size,
    triptych,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # model input size
MEL_BINS = 16
FRAMES = 63  # 1 s at 8 kHz, hop 128
NAMES = ["background", "alpha", "bravo", "charlie"]
# configs/tiny.yaml, made smaller still so a CPU test evaluates in a fraction of a second.
TINY_OVERRIDES = [
    "data.image_size=32",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    "model.audio_embed_dim=64",
    "model.derived_semantics=2",
    "model.head_embedding_dim=16",
    "model.audio.embed_dim=8",
    "model.audio.num_heads=[1,1,1,1]",
    "model.audio.spec_size=64",
    "model.audio.window_size=4",
    "model.visual.in_channels=[8,16,32,64]",
    "model.visual.num_heads=[1,1,1,1]",
    "model.frontend.sample_rate=8000",
    "model.frontend.n_fft=256",
    "model.frontend.hop_length=128",
    "model.frontend.mel_bins=16",
    "model.frontend.fmax=4000.0",
]
# (task, video, frames, annotated frames): v2 in two shards, v1s with an empty-mask frame.
VIDEOS = {
    "v2": [("vidA", 4, {0, 1, 2, 3}), ("vidB", 3, {0, 2})],
    "v1s": [("vidC", 3, {0, 1, 2}), ("vidD", 2, {0, 1})],
}


def tiny_config(task: str = "v2") -> Config:
    num_classes = 1 if task == "v1s" else len(NAMES)
    return load_config(REPO / "configs" / "tiny.yaml", [*TINY_OVERRIDES, f"task={task}", f"model.num_classes={num_classes}"])


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_shards(root: Path) -> Path:
    """SHARDS_DIR with classes.json, manifest.parquet and `{task}/test/shard-*.tar`."""
    rng = np.random.default_rng(3)
    rows = []
    for task, videos in VIDEOS.items():
        folder = root / task / "test"
        folder.mkdir(parents=True)
        for shard_index, (video, frames, annotated) in enumerate(videos):
            with TarWriter(str(folder / schema.SHARD_NAME.format(index=shard_index))) as writer:
                for frame in range(frames):
                    key = schema.sample_key(task, video, frame)
                    height, width = 40, 48
                    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                    mask = np.zeros((height, width), dtype=np.uint8)
                    if not (video == "vidD" and frame == 1):  # vidD frame 1: nothing sounds
                        for class_id in (1, 2, 3)[: 1 + frame % 3]:
                            y0, x0 = int(rng.integers(0, 24)), int(rng.integers(0, 30))
                            mask[y0 : y0 + 14, x0 : x0 + 16] = class_id
                            image[y0 : y0 + 14, x0 : x0 + 16] = (80 * class_id, 40, 255 - 60 * class_id)
                    classes = sorted(set(np.unique(mask).tolist()) - {0})
                    meta = schema.SampleMeta(
                        key=key, task=task, subset=task, split="test", video=video, frame=frame,
                        height=height, width=width, annotated=frame in annotated, silent=not classes,
                        classes=classes, image_ext="png",
                    )
                    members = {
                        "__key__": key,
                        "image.png": png_bytes(image),
                        "logmel.npy": schema.encode_array(rng.normal(-30, 10, (FRAMES, MEL_BINS)).astype(np.float16)),
                        "meta.json": meta.to_json(),
                    }
                    if meta.annotated:
                        members["mask.png"] = schema.encode_mask(mask)
                    writer.write(members)
                    rows.append({"key": key, "task": task, "split": "test", "video": video, "frame": frame, "annotated": meta.annotated})
    classes_doc = {
        "names": NAMES,
        "background": 0,
        "ignore_index": schema.IGNORE_INDEX,
        "tasks": {
            "v2": {"binary": False, "num_classes": len(NAMES), "reads": ["v2"], "ids": list(range(len(NAMES)))},
            "v1s": {"binary": True, "num_classes": 1, "reads": ["v1s"], "ids": None},
        },
    }
    (root / schema.CLASSES_FILE).write_text(json.dumps(classes_doc))
    pq.write_table(pa.Table.from_pylist(rows), root / schema.MANIFEST_FILE)
    return root


def tiny_model(config: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(config.model)
    bank = np.random.default_rng(seed).standard_normal((len(NAMES), 3, config.model.audio_embed_dim)).astype(np.float32)
    model.set_memory_bank(bank)
    return model.eval()


def save_our_checkpoint(model: torch.nn.Module, config: Config, path: Path) -> Path:
    payload = {"format": FORMAT, "model": model.state_dict(), "config": to_dict(config), "classes": NAMES, "step": 7}
    return atomic_torch_save(payload, path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Our checkpoints of a tiny v2 and v1s model."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for task in ("v2", "v1s"):
        config = tiny_config(task)
        out[task] = save_our_checkpoint(tiny_model(config), config, folder / f"{task}.pt")
    return out


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, (SystemExit, DDESegError)):
        raise result.exception
    if isinstance(result.exception, DDESegError):
        return 2, str(result.exception)
    return result.exit_code, result.output


# --------------------------------------------------------------------------------------------
# Palette and pictures
# --------------------------------------------------------------------------------------------


def test_palette_is_the_avsbench_voc_palette():
    palette = avss_palette(71)
    expected = {
        0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
        6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 16: (0, 64, 0),
        70: (32, 128, 128),  # 70 = 0b1_000_110: G, B at bit 7; R at bit 5
    }
    for class_id, rgb in expected.items():
        assert tuple(palette[class_id]) == rgb, class_id
    assert palette.shape == (71, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in avss_palette(256)}) == 256  # every id its own colour


def test_overlay_blends_classes_and_keeps_background():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 1, 2, schema.IGNORE_INDEX
    out = overlay(image, mask)
    assert tuple(out[3, 3]) == (100, 100, 100)  # background untouched
    assert tuple(out[0, 0]) == (111, 60, 60)  # 0.6 * 100 + 0.4 * (128, 0, 0)
    assert tuple(out[1, 1]) == (60, 111, 60)
    assert tuple(out[2, 2]) == (162, 162, 162)  # ignore: blended with white
    assert tuple(colorize(mask)[2, 2]) == (255, 255, 255)


def test_denormalize_inverts_the_loader_normalisation():
    from ddeseg.data.augment import normalize_image

    image = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    assert np.array_equal(denormalize_images(normalize_image(image)[None])[0], image)


def test_triptych_and_contact_sheet_sizes():
    rng = np.random.default_rng(0)
    frames = [
        FramePicture(f"k{i}", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                     rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8), rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8), 0.1 * i)
        for i in range(3)
    ]
    assert triptych(frames[0]).shape == (SIZE, 3 * SIZE, 3)
    assert np.array_equal(triptych(frames[0])[:, :SIZE], frames[0].image)
    sheet = contact_sheet(frames, columns=2)
    width, height = sheet_size(3, SIZE, 2)
    cell = frame_layout(SIZE)  # each cell is one frame picture, numbered from 1
    assert sheet.shape == (height, width, 3) and width == 2 * cell.width + 2 and height == 2 * cell.height + 2
    assert np.array_equal(sheet[: cell.height, : cell.width], frame_picture(frames[0], rank=1))


def test_picture_collector_keeps_best_and_worst_samples_and_worst_scores():
    collector = PictureCollector(samples=2, worst=2)
    images = torch.zeros(3, 3, 4, 4)
    masks = torch.zeros(3, 4, 4, dtype=torch.long)
    collector.add(["c", "a", "e"], images, masks, masks, torch.tensor([0.5, float("nan"), 0.9], dtype=torch.float64))
    collector.add(["b", "d"], images[:2], masks[:2], masks[:2], torch.tensor([0.2, 0.5], dtype=torch.float64))
    # two samples: the best and the worst frame (each frame its own video here); NaN never
    assert [(why, f.key) for why, f in collector.chosen_frames()] == [("best", "e"), ("worst", "b")]
    assert [f.key for f in collector.worst_frames()] == ["b", "c"]  # 0.2, then 0.5 (c before d); NaN never


# --------------------------------------------------------------------------------------------
# Audio controls
# --------------------------------------------------------------------------------------------


def fake_batches(sizes: list[int], mel_bins: int = 2) -> list[dict]:
    """Batches whose log-mel of sample n is filled with n."""
    batches, n = [], 0
    for size in sizes:
        values = torch.arange(n, n + size, dtype=torch.float32)
        batches.append({"logmel": values.view(-1, 1, 1, 1).expand(size, 1, 3, mel_bins).clone(), "key": [str(v) for v in range(n, n + size)]})
        n += size
    return batches


def heard(control: AudioControl, sizes: list[int]) -> dict[int, int]:
    """Which sample's audio each sample got."""
    out = {}
    for batch, audio in control(fake_batches(sizes)):
        for key, value in zip(batch["key"], audio[:, 0, 0, 0].tolist(), strict=True):
            out[int(key)] = int(value)
    return out


def test_shuffled_control_gives_every_frame_another_frames_audio():
    control = AudioControl("shuffled", torch.nn.Identity(), Config())
    assert heard(control, [3, 2]) == {0: 1, 1: 2, 2: 0, 3: 4, 4: 3}
    # batches of one: the previous batch's first frame; a first batch of one waits for the next
    assert heard(control, [1, 1, 2, 1]) == {0: 1, 1: 0, 2: 3, 3: 2, 4: 2}
    assert control.unchanged_frames == 0
    assert heard(control, [1]) == {0: 0} and control.unchanged_frames == 1  # nothing else to hear
    assert heard(AudioControl("none", torch.nn.Identity(), Config()), [2, 1]) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(DDESegError):
        AudioControl("reversed", torch.nn.Identity(), Config())


def test_silent_control_is_the_front_end_of_a_zero_waveform():
    config = tiny_config()
    model = tiny_model(config)
    silent = silent_logmel(model, config, FRAMES, MEL_BINS)
    assert silent.shape == (FRAMES, MEL_BINS)
    assert torch.allclose(silent, torch.full_like(silent, -100.0))  # 10 log10(1e-10): the floor, not 0
    (batch, audio), = AudioControl("silent", model, config)(fake_batches([2], MEL_BINS))
    assert audio.shape == batch["logmel"].shape and bool((audio == -100.0).all())
    with pytest.raises(DDESegError, match="mel bins"):
        silent_logmel(model, config, FRAMES, MEL_BINS + 1)


def test_video_frame_ids_from_keys_or_fields():
    keys = [schema.sample_key("v1s", "a-b.c", 3), schema.sample_key("v1s", "x", 12)]
    assert video_frame_ids({"key": keys}) == (["v1s-a-b__c", "v1s-x"], [3, 12])
    assert video_frame_ids({"key": keys, "video": ["a-b.c", "x"], "frame": torch.tensor([3, 12])}) == (["a-b.c", "x"], [3, 12])


# --------------------------------------------------------------------------------------------
# evaluate_model
# --------------------------------------------------------------------------------------------


def test_evaluate_model_equals_meters_fed_by_hand(shards):
    """The loop scores every annotated frame once, at the model's input size, and nothing else."""
    config = tiny_config("v2")
    model = tiny_model(config)
    context = DistributedContext()
    loader = make_eval_loader(sorted((shards / "v2" / "test").glob("*.tar")), config)
    result = evaluate_model(model, loader, config, context, class_names=NAMES)

    meter = SegmentationMeter(len(NAMES))
    keys = []
    with torch.no_grad():
        for batch in make_eval_loader(sorted((shards / "v2" / "test").glob("*.tar")), config, batch_size=1):
            meter.update(predicted_labels(model(batch["image"], batch["logmel"])), batch["mask"])
            keys += batch["key"]
    expected = meter.compute()
    assert len(keys) == 6 and result["num_frames"] == 6  # the unannotated frame is not scored
    assert result["num_pixels"] == 6 * SIZE * SIZE
    for name in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore"):
        assert result[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name
    assert [result["per_class"][k]["tp"] for k in range(4)] == [expected["per_class"][k]["tp"] for k in range(4)]
    assert [result["per_class"][k]["name"] for k in range(4)] == NAMES
    assert result["audio_control"] == "none" and not result["binary"]
    assert not model.training


def test_evaluate_model_binary_task_uses_the_avsbench_binary_protocol(shards):
    config = tiny_config("v1s")
    model = tiny_model(config)
    loader = make_eval_loader(sorted((shards / "v1s" / "test").glob("*.tar")), config)
    model.train()
    result = evaluate_model(model, loader, config, DistributedContext())
    assert model.training  # mode restored

    binary, meter = AVSBenchBinaryMeter(), SegmentationMeter(2)
    model.eval()
    with torch.no_grad():
        for batch in make_eval_loader(sorted((shards / "v1s" / "test").glob("*.tar")), config):
            logits = model(batch["image"], batch["logmel"])
            assert logits.shape[1] == 1
            binary.update(foreground_logits(logits), batch["mask"], *video_frame_ids(batch))
            meter.update(predicted_labels(logits), batch["mask"])
    expected = binary.compute()
    assert result["binary"] and result["num_classes"] == 2
    assert result["num_videos"] == 2 and result["num_empty_target_frames"] == 1
    assert result["avsbench_miou"] == pytest.approx(expected["avsbench_miou"], rel=1e-12)
    assert result["avsbench_fscore"] == pytest.approx(expected["avsbench_fscore"], rel=1e-12)
    assert result["miou"] == pytest.approx(meter.compute()["miou"], rel=1e-12)
    assert "avsbench_iou" not in result["per_class"][1]


def test_audio_controls_change_what_the_model_hears(shards):
    config = tiny_config("v2")
    model = tiny_model(config)
    paths = sorted((shards / "v2" / "test").glob("*.tar"))
    seen: dict[str, list[torch.Tensor]] = {}
    original_forward = model.forward

    def recording_forward(image, audio, _seen=seen):
        _seen.setdefault(recording_forward.mode, []).append(audio.clone())
        return original_forward(image, audio)

    model.forward = recording_forward
    results = {}
    for mode in ("none", "shuffled", "silent"):
        recording_forward.mode = mode
        results[mode] = evaluate_model(model, make_eval_loader(paths, config), config, DistributedContext(), audio_control=mode)
    none, shuffled, silent = (torch.cat(seen[m]) for m in ("none", "shuffled", "silent"))
    assert none.shape == shuffled.shape == silent.shape
    assert bool((silent == -100.0).all())
    # every frame heard another frame's audio (its batch neighbour's), none its own
    for i, row in enumerate(shuffled):
        sources = [j for j in range(len(none)) if torch.equal(none[j], row)]
        assert sources and i not in sources, (i, sources)
    assert results["shuffled"]["audio_control"] == "shuffled" and results["shuffled"]["audio_control_unchanged_frames"] == 0


# --------------------------------------------------------------------------------------------
# `ddeseg evaluate` end to end
# --------------------------------------------------------------------------------------------


def read_eval(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_cli_writes_metrics_tables_and_pictures_deterministically(shards, checkpoints, tmp_path):
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        code, output = run_cli("--checkpoint", str(checkpoints["v2"]), "--shards", str(shards), "--out", str(out),
                               "--pictures", "3", "--worst", "4", "--device", "cpu")
        assert code == 0, output
    report = read_eval(outs[0])
    for key in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0
    assert list(report["per_class"]) == NAMES
    assert report["per_class"]["bravo"]["id"] == 2 and "iou" in report["per_class"]["bravo"]
    assert (report["task"], report["split"], report["audio_control"]) == ("v2", "test", "none")
    assert report["checkpoint_format"] == FORMAT and report["checkpoint_step"] == 7
    assert report["counts"]["frames"] == 6 == report["counts"]["frames_in_manifest"]
    assert report["counts"]["skipped_samples"] == 0

    pictures = sorted((outs[0] / "pictures").glob("*.png"))
    samples = [p for p in pictures if p.name.startswith("sample-")]
    assert len(samples) == 3 and report["pictures"][:3] == [f"pictures/{p.name}" for p in samples]
    # the samples: the best, the nearest to the median and the worst frame by IoU, across videos
    chosen = report["samples"]
    assert [s["why"] for s in chosen] == ["best", "median", "worst"]
    assert [p.name for p in samples] == [f"sample-{i:03d}-{s['key']}.png" for i, s in enumerate(chosen)]
    assert chosen[2]["iou"] == report["worst_frames"][0]["iou"]  # the split's worst frame
    assert chosen[0]["iou"] >= chosen[1]["iou"] >= chosen[2]["iou"]
    videos = {v for v, _, ann in VIDEOS["v2"] if ann}
    assert len({s["video"] for s in chosen}) == min(3, len(videos))
    for path in samples:
        assert Image.open(path).size == (frame_layout(SIZE).width, frame_layout(SIZE).height)
    assert Image.open(outs[0] / "pictures" / "worst-frames.png").size == sheet_size(4, SIZE, 2)
    assert len(report["worst_frames"]) == 4
    assert [w["iou"] for w in report["worst_frames"]] == sorted(w["iou"] for w in report["worst_frames"])

    markdown = (outs[0] / "eval.md").read_text()
    assert "| DDESeg (split-accumulated) |" in markdown and "| 2 | bravo |" in markdown

    second = read_eval(outs[1])
    assert report == {**second, "pictures": report["pictures"]} and report["pictures"] == second["pictures"]
    for path in pictures:
        assert path.read_bytes() == (outs[1] / "pictures" / path.name).read_bytes()


def test_cli_binary_task_and_controls(shards, checkpoints, tmp_path):
    code, output = run_cli("--checkpoint", str(checkpoints["v1s"]), "--shards", str(shards), "--out", str(tmp_path / "s"),
                           "--task", "v1s", "--audio-control", "silent", "--pictures", "0", "--worst", "0")
    assert code == 0, output
    report = read_eval(tmp_path / "s")
    assert report["binary"] and report["audio_control"] == "silent"
    assert list(report["per_class"]) == ["background", "foreground"]
    assert report["counts"]["num_videos"] == 2 and report["counts"]["frames"] == 5
    assert report["pictures"] == [] and not list((tmp_path / "s" / "pictures").glob("*.png"))


def test_cli_rejects_bad_requests(shards, checkpoints, tmp_path):
    # a v2 model on the binary task
    code, message = run_cli("--checkpoint", str(checkpoints["v2"]), "--shards", str(shards), "--out", str(tmp_path / "x"),
                            "--task", "v1s")
    assert code == 2 and "output classes" in message
    code, message = run_cli("--checkpoint", str(checkpoints["v2"]), "--shards", str(shards), "--out", str(tmp_path / "x"),
                            "--split", "val")
    assert code == 2 and "no shards" in message
    code, message = run_cli("--checkpoint", str(checkpoints["v2"]), "--shards", str(shards), "--out", str(tmp_path / "x"),
                            "--audio-control", "loud")
    assert code != 0


def test_eval_section_is_the_default_of_the_options_and_set_reaches_it(shards, checkpoints, tmp_path):
    """`eval.split` (and the other eval keys) decide when the option is not given; --set changes
    them; an option beats --set; OUT/config.yaml is the resolved config."""
    common = ["--checkpoint", str(checkpoints["v2"]), "--shards", str(shards), "--device", "cpu"]
    code, message = run_cli(*common, "--out", str(tmp_path / "x"), "--set", "eval.split=val")
    assert code == 2 and "no shards" in message  # the tiny shards have only a test split
    out = tmp_path / "set"
    code, output = run_cli(*common, "--out", str(out), "--set", "eval.split=val", "--split", "test",
                           "--set", "eval.pictures=2", "--set", "eval.worst_frames=0", "--set", "eval.audio_control=silent")
    assert code == 0, output
    report = read_eval(out)
    assert report["split"] == "test" and report["audio_control"] == "silent"
    assert len(list((out / "pictures").glob("sample-*.png"))) == 2 and not (out / "pictures" / "worst-frames.png").exists()
    written = load_config(out / "config.yaml")
    assert (written.eval.split, written.eval.pictures, written.eval.audio_control) == ("test", 2, "silent")
    assert written.model == tiny_config("v2").model  # the checkpoint's own config, resolved


def test_official_checkpoint_needs_config_and_memory_bank(shards, tmp_path):
    config = tiny_config("v2")
    model = tiny_model(config)
    state = {k: v for k, v in model.state_dict().items() if k != "memory_bank"}
    official = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 3}, official)
    config_path = tmp_path / "tiny-v2.yaml"
    from ddeseg.config import save_config

    save_config(config, config_path)
    bank = tmp_path / "bank.npy"
    np.save(bank, model.memory_bank.numpy())
    common = ["--checkpoint", str(official), "--shards", str(shards), "--pictures", "0", "--worst", "0"]

    code, message = run_cli(*common, "--out", str(tmp_path / "a"))
    assert code == 2 and "--config" in message
    code, message = run_cli(*common, "--out", str(tmp_path / "a"), "--config", str(config_path))
    assert code == 2 and "--memory-bank" in message
    code, output = run_cli(*common, "--out", str(tmp_path / "a"), "--config", str(config_path), "--memory-bank", str(bank))
    assert code == 0, output
    ours = save_our_checkpoint(model, config, tmp_path / "ours.pt")
    code, output = run_cli("--checkpoint", str(ours), "--shards", str(shards), "--out", str(tmp_path / "b"), "--pictures", "0", "--worst", "0")
    assert code == 0, output
    official_report, our_report = read_eval(tmp_path / "a"), read_eval(tmp_path / "b")
    assert official_report["checkpoint_format"] == "official"
    assert official_report["miou"] == our_report["miou"] and official_report["per_class"] == our_report["per_class"]


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


# Run under torchrun: `ddeseg evaluate` once per argument list (JSON), in one launch of 2 processes.
# The process group is kept between the commands (re-initialising one under torchrun can hang).
@pytest.mark.slow  # two torchrun processes each import torch and build the model (~15 s on 2 cores)
def test_torchrun_two_processes_give_the_numbers_of_one(shards, checkpoints, tmp_path):
    """Both tasks (the binary protocol groups frames by video, and videos straddle the ranks)."""
    runs = {
        task: ["evaluate", "--checkpoint", str(checkpoints[task]), "--shards", str(shards), "--task", task,
               "--pictures", "2", "--worst", "3", "--device", "cpu"]
        for task in ("v2", "v1s")
    }
    for task, args in runs.items():
        code, output = run_cli(*args[1:], "--out", str(tmp_path / task / "one"))
        assert code == 0, output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for task, args in runs.items():
        # One torchrun per evaluation, through the real entry point (`python -m ddeseg`), as users run it.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "ddeseg", *args, "--out", str(tmp_path / task / "two")]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                                  start_new_session=True)
        assert finished.returncode == 0, finished.stderr[-3000:]
    for task in runs:
        one, two = read_eval(tmp_path / task / "one"), read_eval(tmp_path / task / "two")
        assert two["counts"]["world_size"] == 2 and one["counts"]["world_size"] == 1
        for key in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore"):
            assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-15), (task, key)
        for name, entry in one["per_class"].items():
            for field, value in entry.items():
                if isinstance(value, (int, bool)) or value is None:
                    assert two["per_class"][name][field] == value, (task, name, field)
                else:
                    assert two["per_class"][name][field] == pytest.approx(value, rel=1e-12, abs=1e-15), (task, name, field)
        assert {k: v for k, v in two["counts"].items() if k != "world_size"} == {
            k: v for k, v in one["counts"].items() if k != "world_size"
        }
        assert two["pictures"] == one["pictures"]
        assert [w["key"] for w in two["worst_frames"]] == [w["key"] for w in one["worst_frames"]]
        for picture in one["pictures"]:
            assert (tmp_path / task / "one" / picture).read_bytes() == (tmp_path / task / "two" / picture).read_bytes()
