"""`ddeseg prepare` on the synthetic datasets: every sample against the generator's ground truth
(synth_meta.json), the same videos through two layouts, the stored log-mel against the model's
front end, and the official bbox json.

The expected values are computed from synth_meta.json and the raw files with other code paths
than prepare's (class-id PNGs instead of colour masks, instance boxes instead of mask boxes,
torchaudio's resampler instead of soxr)."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import torchaudio
from PIL import Image

from ddeseg.classes import SOUNDING_OBJECT, VPO_CLASSES
from ddeseg.config import Config
from ddeseg.data.schema import (
    AUDIO,
    IGNORE_INDEX,
    LOGMEL,
    MASK,
    META,
    SampleMeta,
    decode_array,
    decode_mask,
    image_member,
    sample_key,
)
from ddeseg.data.shards import task_label_lut
from ddeseg.data.stream import read_shard_samples
from ddeseg.pipelines.prepare import PreparePaths, prepare
from ddeseg.pipelines.synth import generate
from ddeseg.stage import RunOptions

SEED = 11
SIZE = 48
CLASSES = 5
AVSS = ("v1s", "v1m", "v2")
VPO = ("VPO-SS", "VPO-MS", "VPO-MSMI")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The same seed in three layouts: avsbench (AVSS tasks), ddeseg (all six: its AVSS videos
    are those of avsbench) and vpo."""
    base = tmp_path_factory.mktemp("raw")
    return {
        "avsbench": generate(
            "avsbench", base / "avsbench", videos=9, classes=CLASSES, seed=SEED, image_size=SIZE
        ),
        "ddeseg": generate("ddeseg", base / "ddeseg", videos=18, classes=CLASSES, seed=SEED, image_size=SIZE),
        "vpo": generate("vpo", base / "vpo", videos=12, classes=CLASSES, seed=SEED, image_size=SIZE),
    }


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    runs = {
        "avsbench": ("avsbench", "auto"),
        "avsbench-object": ("avsbench", "object"),
        "ddeseg": ("ddeseg", "auto"),
        "vpo": ("vpo", "auto"),
    }
    out = {}
    for name, (layout, avsbench_part) in runs.items():
        config = Config()
        config.data.samples_per_shard = 16
        config.prepare.export_bbox_json = True
        config.prepare.avsbench_part = avsbench_part
        result = prepare(config, PreparePaths(layout=layout, root=raw[layout], out=base / name), RunOptions(progress=False))
        assert result.rejects == [], result.rejects
        out[name] = base / name
    return out


def load_samples(out: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted(out.glob("*/*/shard-*.tar")):
        for sample in read_shard_samples(shard):
            samples[sample["__key__"]] = sample
    return samples


def meta_of(raw_dir: Path) -> dict:
    return json.loads((raw_dir / "synth_meta.json").read_text())


def read_l_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image).copy()


@functools.cache
def resampler(rate: int, target: int) -> torchaudio.transforms.Resample:
    """torchaudio's windowed-sinc resampler with librosa's `kaiser_best` settings (not soxr)."""
    return torchaudio.transforms.Resample(
        rate,
        target,
        lowpass_filter_width=64,
        rolloff=0.9475937,
        resampling_method="sinc_interp_kaiser",
        beta=14.769656,
    )


def resampled(wave: np.ndarray, rate: int, target: int, samples: int) -> np.ndarray:
    with torch.inference_mode():
        out = resampler(rate, target)(torch.from_numpy(np.ascontiguousarray(wave, np.float32))).numpy()
    return np.tile(out, int(np.ceil(samples / len(out))))[:samples]


def assert_audio_close(actual: np.ndarray, expected: np.ndarray, key: str) -> None:
    edge = 256  # resamplers differ in their edge handling
    assert actual.shape == expected.shape, key
    error = actual[edge:-edge] - expected[edge:-edge]
    scale = max(float(np.sqrt(np.mean(expected[edge:-edge] ** 2))), 1e-4)
    assert float(np.sqrt(np.mean(error**2))) < 0.03 * scale, key


def union(boxes: list[list[float]]) -> list[float]:
    return [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]


def expected_frames(layout_run: str, raw_dir: Path):
    """(key, video record, frame record, part) for every sample the run must contain."""
    meta = meta_of(raw_dir)
    for video in meta["videos"]:
        task = video["task"]
        for frame in video["frames"]:
            if layout_run == "avsbench":
                part, video_id = "AVSS", video["video"]
            elif layout_run == "avsbench-object":
                if task == "v2":
                    continue
                part, video_id = ("S4" if task == "v1s" else "MS3"), video["ids"]["name"]
            elif layout_run == "ddeseg":
                part = "AVSS" if task in AVSS else "VPO"
                video_id = video["video"]
                if not frame["annotated"]:
                    continue  # the reorganised csv lists annotated seconds only
            else:
                part = "VPO"
                video_id = video["video"]
                if task == "VPO-SS":
                    video_id = f"{video['ids']['img_id']:012d}_{video['objects'][0]['ann_id']:012d}"
            yield sample_key(task, video_id, frame["frame"]), video, frame, part


def expected_mask(
    run: str, raw_dir: Path, meta: dict, video: dict, frame: dict, names: list[str]
) -> np.ndarray:
    """Unified class ids from the raw class-id PNGs (never the colour / binary / COCO masks
    that prepare reads, except through the generator's own class table)."""
    classes = {c["id"]: c for c in meta["classes"]}
    files = frame["files"]
    if run in ("avsbench", "avsbench-object") or (run == "ddeseg" and video["task"] in AVSS):
        class_map = read_l_png(raw_dir / files["AVSS"]["mask"])  # labels_semantic, also for S4/MS3 videos
        # the avsbench layout names classes by the real AVSS list (its label2idx.json)
        name_key = "name" if run == "ddeseg" else "avss_name"
        if run == "avsbench-object":
            if video["task"] == "v1s":
                category = classes[video["objects"][0]["class_id"]][name_key]
                return np.where(class_map > 0, names.index(category), 0).astype(np.uint8)
            return np.where(class_map > 0, names.index(SOUNDING_OBJECT), 0).astype(np.uint8)
        lut = np.zeros(256, np.uint8)
        for class_id, record in classes.items():
            lut[class_id] = names.index(record[name_key])
        return lut[class_map]
    if run == "ddeseg":  # VPO part: VPO class ids
        class_map = read_l_png(raw_dir / files["VPO"]["mask"])
        lut = np.zeros(256, np.uint8)
        for index, name in enumerate(VPO_CLASSES):
            lut[index] = names.index(name)
        return lut[class_map]
    coco_map = read_l_png(raw_dir / files["VPO"]["mask"])  # vpo release: COCO ids, 255 ignore
    lut = np.zeros(256, np.uint8)
    for record in meta["classes"]:
        if record["coco_id"]:
            lut[record["coco_id"]] = names.index(record["vpo_name"])
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[coco_map]


def expected_audio(run: str, raw_dir: Path, meta: dict, frame: dict, part: str, config: Config) -> np.ndarray:
    target = config.model.frontend.sample_rate
    samples = int(round(config.data.clip_seconds * target))
    files = frame["files"][part]
    if "audio_sources" in files:  # vpo release: sum of CAVP's centred 3 s crops
        window = meta["vpo_window_s"] * meta["sample_rate_hz"]
        mix = 0
        for source in files["audio_sources"]:
            wave, rate = soundfile.read(raw_dir / source["path"], dtype="float32")
            start = len(wave) // 2 - window // 2
            mix = mix + resampled(wave[start : start + window], rate, target, samples)
        return mix
    wave, rate = soundfile.read(raw_dir / files["audio"], dtype="float32", always_2d=True)
    start = int(files["audio_start_s"] * rate)
    wave = wave.mean(axis=1)
    segment = wave[start : start + rate] if run != "ddeseg" or part == "AVSS" else wave
    return resampled(segment, rate, target, samples)


@pytest.mark.parametrize("run", ["avsbench", "avsbench-object", "ddeseg", "vpo"])
def test_every_sample_matches_the_generator_ground_truth(run, raw, prepared):
    layout = run.split("-")[0]
    raw_dir, out = raw[layout], prepared[run]
    meta = meta_of(raw_dir)
    names = json.loads((out / "classes.json").read_text())["names"]
    samples = load_samples(out)
    expected = list(expected_frames(run, raw_dir))
    assert sorted(samples) == sorted(key for key, *_ in expected)
    config = Config()
    for key, video, frame, part in expected:
        sample = samples[key]
        info = SampleMeta.from_json(sample[META])
        files = frame["files"][part]
        assert (info.task, info.split, info.frame) == (video["task"], video["split"], frame["frame"]), key
        assert (info.height, info.width) == (video["height"], video["width"]), key
        assert sample[image_member(sample)] == (raw_dir / files["image"]).read_bytes(), key
        assert info.annotated == frame["annotated"], key
        if not frame["annotated"]:
            assert MASK not in sample and info.classes == [] and info.union_box is None, key
        else:
            mask = decode_mask(sample[MASK])
            assert np.array_equal(mask, expected_mask(run, raw_dir, meta, video, frame, names)), key
            # classes and boxes from the generator's instance records, not from the mask
            by_id = {c["id"]: c for c in meta["classes"]}
            name_key = "name" if run == "ddeseg" else "avss_name"  # avsbench: the real AVSS names
            if run == "avsbench-object":
                unified = {
                    c: names.index(
                        SOUNDING_OBJECT
                        if video["task"] == "v1m"
                        else by_id[video["objects"][0]["class_id"]][name_key]
                    )
                    for c in by_id
                }
            elif video["task"] in VPO:
                unified = {c: names.index(by_id[c]["vpo_name"]) for c in by_id if by_id[c]["vpo_name"]}
            else:
                unified = {c: names.index(by_id[c][name_key]) for c in by_id}
            assert info.classes == sorted({unified[c] for c in frame["sounding_classes"]}), key
            size = np.array([video["width"], video["height"]] * 2, dtype=float)
            sounding = [v for v in frame["visible"] if v["sounding"]]
            if sounding:
                assert info.union_box == pytest.approx(
                    union([list(np.array(v["box"]) / size) for v in sounding])
                ), key
            else:
                assert info.union_box is None, key
            for class_id in info.classes:
                boxes = [
                    list(np.array(v["box"]) / size) for v in sounding if unified[v["class_id"]] == class_id
                ]
                assert info.class_boxes[str(class_id)] == pytest.approx(union(boxes)), key
            if run == "ddeseg" and video["task"] in AVSS:
                assert info.silent == frame["silent"], key  # the csv's silent column
            else:
                assert info.silent == (not frame["sounding_classes"]), key
        audio = decode_array(sample[AUDIO])
        assert audio.dtype == np.float32
        assert_audio_close(audio, expected_audio(run, raw_dir, meta, frame, part, config), key)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["key"] for row in manifest) == sorted(samples)
    for row in manifest:
        info = SampleMeta.from_json(samples[row["key"]][META])
        assert row["classes"] == info.classes and row["union_box"] == info.union_box
        assert dict(row["class_boxes"]) == {int(k): v for k, v in info.class_boxes.items()}
        assert (row["silent"], row["annotated"], row["video"]) == (info.silent, info.annotated, info.video)
        assert (out / row["shard"]).is_file() and row["shard"].startswith(f"{row['task']}/{row['split']}/")
    assert (out / "rejects.jsonl").read_text() == ""
    report = json.loads((out / "prepare.json").read_text())
    assert report["samples"] == len(samples) and report["rejects"] == 0
    assert report["config"]["model"]["frontend"]["sample_rate"] == 22050
    assert sum(sum(splits.values()) for splits in report["counts"].values()) == len(samples)


def test_vpo_class_ids_map_back_to_the_22_vpo_classes(raw, prepared):
    """Through classes.json, a VPO mask gives the generator's VPO class ids (class k = VPO class k)."""
    classes = json.loads((prepared["vpo"] / "classes.json").read_text())
    for key, video, frame, _part in expected_frames("vpo", raw["vpo"]):
        lut = task_label_lut(classes, video["task"])
        sample = load_samples(prepared["vpo"])[key]
        local = lut[decode_mask(sample[MASK])]
        assert set(np.unique(local).tolist()) - {0, IGNORE_INDEX} == set(frame["sounding_classes"])


def test_avsbench_and_ddeseg_layouts_prepare_to_the_same_samples(prepared):
    from_avsbench = load_samples(prepared["avsbench"])
    from_ddeseg = load_samples(prepared["ddeseg"])
    avss_keys = {key for key in from_ddeseg if key.split("-")[0] in AVSS}
    # ddeseg's csv lists annotated seconds only; avsbench also keeps v1s train frames 1..4 (unannotated)
    assert avss_keys and avss_keys <= set(from_avsbench)
    extra = set(from_avsbench) - avss_keys
    assert all(not SampleMeta.from_json(from_avsbench[key][META]).annotated for key in extra)
    for key in sorted(avss_keys):
        a, b = from_avsbench[key], from_ddeseg[key]
        assert a[image_member(a)] == b[image_member(b)], key
        assert np.array_equal(decode_mask(a[MASK]), decode_mask(b[MASK])), key
        meta_a, meta_b = SampleMeta.from_json(a[META]), SampleMeta.from_json(b[META])
        assert (meta_a.classes, meta_a.union_box, meta_a.class_boxes) == (
            meta_b.classes,
            meta_b.union_box,
            meta_b.class_boxes,
        )
        assert np.allclose(decode_array(a[AUDIO]), decode_array(b[AUDIO]), atol=1e-5), key
        assert np.allclose(
            decode_array(a[LOGMEL]).astype(np.float32), decode_array(b[LOGMEL]).astype(np.float32), atol=2e-2
        ), key


def test_stored_logmel_is_the_model_front_end_of_the_stored_audio(prepared):
    from ddeseg.models.frontend import LogMelFrontend

    frontend = LogMelFrontend(Config().model.frontend).eval()
    samples = list(load_samples(prepared["ddeseg"]).values())[:24]
    audio = torch.from_numpy(np.stack([decode_array(s[AUDIO]) for s in samples]))
    with torch.inference_mode():
        expected = frontend(audio).numpy()
    stored = np.stack([decode_array(s[LOGMEL]) for s in samples])
    assert stored.dtype == np.float16 and stored.shape == expected.shape
    assert stored.shape[2] == Config().model.frontend.mel_bins
    # float16 keeps ~3 significant digits
    assert np.allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_exported_bbox_json_matches_the_official_file(raw, prepared):
    """Our `--export-bbox-json` equals the generator's avss_bbox_orisize.json for every frame with
    a sounding region (the generator writes the whole frame for an empty mask, we write null)."""
    ours = json.loads((prepared["ddeseg"] / "bbox" / "avss_bbox_orisize.json").read_text())
    official = json.loads((raw["ddeseg"] / "AVSSData" / "avss_bbox_orisize.json").read_text())
    assert set(ours) == set(official)
    for uid, box in official.items():
        if ours[uid] is None:
            assert box == [0.0, 0.0, 1.0, 1.0], uid
        else:
            assert ours[uid] == pytest.approx(box), uid
    vpo = json.loads((prepared["ddeseg"] / "bbox" / "vpo_bbox_orisize.json").read_text())
    official_vpo = json.loads((raw["ddeseg"] / "VPO_Clean" / "vpo_bbox_orisize.json").read_text())
    vpo = {key.removeprefix("VPO_Clean/"): box for key, box in vpo.items()}
    assert set(vpo) == set(official_vpo)
    for key, box in official_vpo.items():
        assert vpo[key] == pytest.approx(box), key


def test_inspect_summary_and_dump(prepared, tmp_path):
    from ddeseg.pipelines.inspect import dump_sample, manifest_summary

    summary = manifest_summary(prepared["avsbench"])
    assert summary["samples"] == sum(c["samples"] for c in summary["splits"].values())
    assert summary["splits"]["v1s", "train"]["annotated"] < summary["splits"]["v1s", "train"]["samples"]
    key = next(iter(load_samples(prepared["avsbench"])))
    written = dump_sample(prepared["avsbench"], key, tmp_path)
    names = {path.name for path in written}
    assert {
        f"{key}.image.png",
        f"{key}.overlay.png",
        f"{key}.wav",
        f"{key}.logmel.png",
        f"{key}.meta.json",
    } <= names
    wave, rate = soundfile.read(tmp_path / f"{key}.wav")
    assert rate == 22050 and len(wave) == 22050
    with Image.open(io.BytesIO((tmp_path / f"{key}.overlay.png").read_bytes())) as overlay:
        assert overlay.size == (
            SampleMeta.from_json((tmp_path / f"{key}.meta.json").read_bytes()).width,
            SIZE,
        )


def test_inspect_command_line(prepared, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "ddeseg", "inspect", str(prepared["vpo"])]
    summary = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "VPO-MSMI" in summary and "0 rejected" in summary
    key = next(iter(load_samples(prepared["vpo"])))
    dumped = subprocess.run(
        command + ["--dump", key, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert dumped.returncode == 0 and (tmp_path / f"{key}.overlay.png").is_file()
    missing = subprocess.run(
        command + ["--dump", "no-such-key", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no sample 'no-such-key'" in missing.stderr
