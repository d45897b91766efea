"""`ddeseg synth`: the files of each layout against `synth_meta.json`, read the way the official
loaders read them (AVSBench `avs_scripts/*`, DDESeg `dataload/*`, CAVP `dataset/vpo_*`)."""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from typer.testing import CliRunner

from ddeseg.classes import COCO_TO_VPO, avss_palette
from ddeseg.cli.app import app
from ddeseg.errors import DDESegError
from ddeseg.pipelines.synth import META_NAME, generate
from ddeseg.pipelines.synthetic.scenes import band_energy

RATE = 16_000
TINY = {"classes": 6, "image_size": 64, "offscreen_rate": 0.6, "silent_rate": 0.25, "seed": 3}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    return {
        "avsbench": generate("avsbench", base / "avsbench", videos=9, **TINY),
        "ddeseg": generate("ddeseg", base / "ddeseg", videos=12, **TINY),
        "vpo": generate("vpo", base / "vpo", videos=12, **TINY),
    }


def load_meta(root: Path) -> dict:
    return json.loads((root / META_NAME).read_text())


def frames_of(meta: dict):
    for video in meta["videos"]:
        for frame in video["frames"]:
            yield video, frame


def part_frames(meta: dict, part: str):
    """(video, frame, files) of every frame that `part` of the layout holds."""
    for video, frame in frames_of(meta):
        if part in frame["files"]:
            yield video, frame, frame["files"][part]


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def read_audio(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == RATE, path
    return audio


def mask_classes(meta: dict, part: str, path: Path) -> tuple[set[int], dict[int, int]]:
    """Class ids present in a mask file and their pixel counts, decoded by the part's encoding."""
    encoding = meta["parts"][part]["mask_encoding"]
    with Image.open(path) as image:
        assert image.mode == "L", f"{path}: index masks must be 'L', got {image.mode}"
        values = np.asarray(image)
    if encoding == "binary-255":
        assert set(np.unique(values)) <= {0, 255}
        count = int(np.count_nonzero(values))
        return ({-1} if count else set()), ({-1: count} if count else {})
    if encoding == "coco-id":
        coco_to_class = {c["coco_id"]: c["id"] for c in meta["classes"] if c["coco_id"] is not None}
        values = values[values != 255]
        ids = np.array([coco_to_class[int(v)] if v else 0 for v in values.reshape(-1)], dtype=np.int64)
    else:  # class-id, vpo-id: the synthetic class id itself
        ids = values.reshape(-1).astype(np.int64)
    counts = np.bincount(ids, minlength=len(meta["classes"]) + 1)
    present = {int(c): int(counts[c]) for c in np.flatnonzero(counts) if c != 0}
    return set(present), present


LAYOUT_PARTS = [("avsbench", "S4"), ("avsbench", "MS3"), ("avsbench", "AVSS"), ("ddeseg", "AVSS"),
                ("ddeseg", "VPO"), ("vpo", "VPO")]


@pytest.mark.parametrize(("layout", "part"), LAYOUT_PARTS)
def test_files_open_with_the_expected_formats(datasets, layout, part):
    root = datasets[layout]
    meta = load_meta(root)
    seen = 0
    for video, _frame, files in part_frames(meta, part):
        seen += 1
        with Image.open(root / files["image"]) as image:
            assert image.size == (video["width"], video["height"])
            assert image.format == ("PNG" if part in ("S4", "MS3") else "JPEG")
            assert image.mode == "RGB"
        for key in ("mask", "mask_rgb"):
            if files.get(key):
                with Image.open(root / files[key]) as mask:
                    assert mask.size == (video["width"], video["height"])
                    assert mask.mode == ("RGB" if key == "mask_rgb" else "L")
        if "audio_sources" in files:
            for source in files["audio_sources"]:
                assert read_audio(root / source["path"]).shape == (meta["vpo_clip_s"] * RATE,)
        else:
            audio = read_audio(root / files["audio"])
            if part == "VPO":
                assert audio.shape == (meta["vpo_window_s"] * RATE,)
                stereo = read_audio(root / files["audio_stereo"])
                assert stereo.shape == (meta["vpo_window_s"] * RATE, 2)
            elif layout == "ddeseg":
                assert audio.shape == (RATE,)  # one wav per second
            else:
                assert audio.shape == (video["num_frames"] * RATE,)
    assert seen > 0


@pytest.mark.parametrize(("layout", "part"), LAYOUT_PARTS)
def test_masks_hold_exactly_the_sounding_visible_objects(datasets, layout, part):
    root = datasets[layout]
    meta = load_meta(root)
    checked = 0
    for _video, frame, files in part_frames(meta, part):
        assert (files["mask"] is not None) == frame["annotated"]
        if not frame["annotated"]:
            continue
        present, counts = mask_classes(meta, part, root / files["mask"])
        expected: dict[int, int] = {}
        for item in frame["visible"]:
            if item["sounding"]:
                key = -1 if meta["parts"][part]["mask_encoding"] == "binary-255" else item["class_id"]
                expected[key] = expected.get(key, 0) + item["area_px"]
        assert counts == expected, (files["mask"], frame)
        if meta["parts"][part]["mask_encoding"] != "binary-255":
            assert present == set(frame["sounding_classes"])
        assert not set(frame["offscreen"]) & present
        checked += 1
    assert checked > 0


def test_avss_colour_masks_decode_to_the_semantic_masks(datasets):
    """The official `color_mask_to_label` with the palette of len(label2idx) classes."""
    root = datasets["avsbench"]
    meta = load_meta(root)
    label2idx = json.loads((root / "label2idx.json").read_text())
    # the release's file: background + the 70 AVSS classes in alphabetical order, values from 1
    assert len(label2idx) == 71 and list(label2idx)[0] == "background"
    assert list(label2idx)[1:] == sorted(list(label2idx)[1:])
    assert {"accordion", "woman", "emergency-car", "vacuum-cleaner"} <= set(label2idx)
    assert list(label2idx.values()) == list(range(1, 72))
    assert [c["avss_name"] for c in meta["classes"]] == list(label2idx)[1 : len(meta["classes"]) + 1]
    palette = avss_palette(len(label2idx)).astype(np.int32)
    # The VOC colours of get_v2_pallete, written out: ids 1..9.
    voc = [(128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128), (128, 128, 128),
           (64, 0, 0), (192, 0, 0)]
    assert [tuple(c) for c in palette[1:4]] == voc[:3] and tuple(palette[0]) == (0, 0, 0)
    assert [tuple(c) for c in avss_palette(10)[1:]] == voc
    for _video, frame in frames_of(meta):
        files = frame["files"]["AVSS"]
        if not frame["annotated"]:
            assert files["mask_rgb"] is None
            continue
        rgb = np.asarray(Image.open(root / files["mask_rgb"]).convert("RGB")).astype(np.int32)
        matches = np.stack([np.all(rgb == colour, axis=-1) for colour in palette], axis=-1)
        assert matches.sum(axis=-1).min() == 1, "a colour outside the palette"
        semantic = np.asarray(Image.open(root / files["mask"]))
        assert np.array_equal(np.argmax(matches, axis=-1), semantic)


def second_of(root: Path, meta: dict, files: dict) -> np.ndarray:
    audio = read_audio(root / files["audio"])
    start = int(files["audio_start_s"] * RATE)
    return audio[start : start + RATE]


@pytest.mark.parametrize(("layout", "part"), [("avsbench", "AVSS"), ("avsbench", "S4"), ("ddeseg", "AVSS")])
def test_each_second_sounds_exactly_its_classes(datasets, layout, part):
    """Energy in a class's band is high in a second exactly when that class sounds in it, visible
    or off-screen; silent seconds hold only the faint background hiss and have empty masks."""
    root = datasets[layout]
    meta = load_meta(root)
    bands = {c["id"]: tuple(c["band_hz"]) for c in meta["classes"]}
    loud, quiet = [], []
    offscreen_events = silent_frames = 0
    for _video, frame, files in part_frames(meta, part):
        second = second_of(root, meta, files)
        heard = set(frame["sounding_classes"]) | set(frame["offscreen"])
        heard |= {item["class_id"] for item in frame["visible"] if item["sounding"]}
        for class_id, band in bands.items():
            (loud if class_id in heard else quiet).append(band_energy(second, RATE, band))
        offscreen_events += len(frame["offscreen"])
        if frame["silent"]:
            silent_frames += 1
            assert not heard
            assert float(np.sqrt(np.mean(second**2))) < 0.005
            if frame["annotated"]:
                present, _ = mask_classes(meta, part, root / files["mask"])
                assert present == set()
    assert silent_frames > 0
    if part != "S4":
        assert offscreen_events > 0
    assert min(loud) > 20 * max(quiet), (min(loud), max(quiet))


def test_vpo_sources_sound_in_their_bands(datasets):
    root = datasets["vpo"]
    meta = load_meta(root)
    bands = {c["id"]: tuple(c["band_hz"]) for c in meta["classes"]}
    for video, frame in frames_of(meta):
        sources = frame["files"]["VPO"]["audio_sources"]
        sounding = sorted(item["instance"] for item in frame["visible"] if item["sounding"])
        assert sorted(source["instance"] for source in sources) == sounding
        for source in sources:
            clip = read_audio(root / source["path"])[:RATE]
            energies = {c: band_energy(clip, RATE, band) for c, band in bands.items()}
            assert max(energies, key=energies.get) == source["class_id"]
            box = next(v["box"] for v in frame["visible"] if v["instance"] == source["instance"])
            centre_x = (box[0] + box[2] + 1) / 2
            assert abs(source["audio_pos"] - centre_x / video["width"]) < 0.03


def test_ddeseg_vpo_audio_is_cavp_mix(datasets):
    """mono = sum of the centred 3 s crops; stereo pans each source by audio_pos (CAVP)."""
    meta_vpo, meta_dd = load_meta(datasets["vpo"]), load_meta(datasets["ddeseg"])
    by_key = {(v["task"], v["index"]): v for v in meta_vpo["videos"]}
    compared = 0
    for video in meta_dd["videos"]:
        if not video["task"].startswith("VPO"):
            continue
        original = by_key[(video["task"], video["index"])]
        files = video["frames"][0]["files"]["VPO"]
        mono = read_audio(datasets["ddeseg"] / files["audio"])
        stereo = read_audio(datasets["ddeseg"] / files["audio_stereo"])
        window = meta_vpo["vpo_window_s"] * RATE
        expected_mono, expected_stereo = 0, 0
        for source in original["frames"][0]["files"]["VPO"]["audio_sources"]:
            clip = read_audio(datasets["vpo"] / source["path"])
            start = clip.shape[0] // 2 - window // 2
            crop = clip[start : start + window]
            expected_mono = expected_mono + crop
            pan = source["audio_pos"]
            expected_stereo = expected_stereo + np.stack([crop * (1 - pan), crop * pan], axis=1)
        scale = float(np.max(np.abs(mono))) / max(float(np.max(np.abs(expected_mono))), 1e-9)
        np.testing.assert_allclose(mono, expected_mono * scale, atol=2e-4)
        np.testing.assert_allclose(stereo, expected_stereo * scale, atol=2e-4)
        compared += 1
    assert compared > 0


# --------------------------------------------------------------------------------------------
# csv rows match the files on disk, read the way the official loaders read them
# --------------------------------------------------------------------------------------------


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def meta_files(meta: dict) -> set[str]:
    listed = set()
    for video in meta["videos"]:
        for files in video["files"].values():
            listed |= {value for key, value in files.items() if key in ("audio", "log_mel") and value}
        for frame in video["frames"]:
            for files in frame["files"].values():
                listed |= {files[k] for k in ("image", "mask", "mask_rgb", "audio", "audio_stereo") if files.get(k)}
                listed |= {source["path"] for source in files.get("audio_sources", [])}
    return listed


def test_avsbench_tables_match_files(datasets):
    root = datasets["avsbench"]
    meta = load_meta(root)
    expected: set[str] = set()
    # S4 (avs_s4/dataloader.py): name at 0, category at 2, split column; 5 frames; train: mask _1
    header, rows = read_csv_rows(root / "Single-source/s4_meta_data.csv")
    assert header[2:] == ["category", "split"]
    for row in rows:
        name, category, split = row[0], row[2], row[3]
        for number in range(1, 6):
            expected.add(f"Single-source/s4_data/visual_frames/{split}/{category}/{name}/{name}_{number}.png")
        for number in range(1, (1 if split == "train" else 5) + 1):
            expected.add(f"Single-source/s4_data/gt_masks/{split}/{category}/{name}/{name}_{number}.png")
        expected.add(f"Single-source/s4_data/audio_wav/{split}/{category}/{name}.wav")
        expected.add(f"Single-source/s4_data/audio_log_mel/{split}/{category}/{name}.pkl")
    assert sorted(r[0] for r in rows) == sorted(v["ids"]["name"] for v in meta["videos"] if v["task"] == "v1s")
    # MS3 (avs_ms3/dataloader.py): name at 0, split column; frames without split folder
    header, rows = read_csv_rows(root / "Multi-sources/ms3_meta_data.csv")
    assert header[1] == "split"
    for name, split in rows:
        for number in range(1, 6):
            expected.add(f"Multi-sources/ms3_data/visual_frames/{name}/{name}.mp4_{number}.png")
            expected.add(f"Multi-sources/ms3_data/gt_masks/{split}/{name}/{name}_{number}.png")
        expected.add(f"Multi-sources/ms3_data/audio_wav/{split}/{name}.wav")
        expected.add(f"Multi-sources/ms3_data/audio_log_mel/{split}/{name}.pkl")
    # AVSS (avss/color_dataloader.py): columns by name; frames / labels_rgb listed per folder
    header, rows = read_csv_rows(root / "metadata.csv")
    assert header == ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
    for row in rows:
        record = dict(zip(header, row, strict=True))
        folder = f"{record['label']}/{record['uid']}"
        frames = 10 if record["label"] == "v2" else 5
        masks = 1 if (record["label"] == "v1s" and record["split"] == "train") else frames
        assert len(list((root / folder / "frames").iterdir())) == frames
        assert len(list((root / folder / "labels_rgb").iterdir())) == masks
        expected |= {f"{folder}/frames/{i}.jpg" for i in range(frames)}
        expected |= {f"{folder}/labels_rgb/{i}.png" for i in range(masks)}
        expected |= {f"{folder}/labels_semantic/{i}.png" for i in range(masks)}
        expected.add(f"{folder}/audio.wav")
        assert "frames" not in record["uid"] and ".jpg" not in record["uid"]
    assert {r[1] for r in rows} == {v["video"] for v in meta["videos"]}
    tables = {"Single-source/s4_meta_data.csv", "Multi-sources/ms3_meta_data.csv", "metadata.csv", "label2idx.json"}
    assert all_files(root) == expected | tables | {META_NAME}
    assert meta_files(meta) == expected


def test_ddeseg_tables_match_files(datasets):
    root = datasets["ddeseg"]
    meta = load_meta(root)
    expected: set[str] = set()
    # AVSS part (data_load_aug_avss.py): header skipped, uid at 1, split at 4, subset at 5
    header, rows = read_csv_rows(root / "AVSSData/metadata_w_silent.csv")
    boxes = json.loads((root / "AVSSData/avss_bbox_orisize.json").read_text())
    annotated = {
        (f"{v['video']}_{f['frame']}", f["silent"])
        for v, f in frames_of(meta) if v["task"] in ("v1s", "v1m", "v2") and f["annotated"]
    }
    assert {(row[1], row[6] == "1") for row in rows} == annotated
    assert set(boxes) == {row[1] for row in rows}
    for row in rows:
        video, index = row[1].rsplit("_", 1)
        frame_path = f"AVSSData/{row[5]}/{video}/frames/{index}.jpg"
        expected.add(frame_path)
        expected.add(frame_path.replace("frames", "labels_semantic").replace(".jpg", ".png"))
        expected.add(frame_path.replace("frames", "audios").replace(".jpg", ".wav"))
        x0, y0, x1, y1 = boxes[row[1]]
        assert 0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0
    # VPO part (data_load_aug_vpo.py): uid, frame, mask at 0..2; split and type by name
    header, rows = read_csv_rows(root / "VPO_Clean/vpo_data_clean.csv")
    vpo_boxes = json.loads((root / "VPO_Clean/vpo_bbox_orisize.json").read_text())
    # the released 6-column form: uid `{type}/{id}`, frame, mask, category list, split, type
    assert header == ["uid", "frame", "mask", "category", "split", "type"]
    vpo_videos = {v["video"]: v for v in meta["videos"] if v["task"].startswith("VPO")}
    for uid, frame, mask, categories, _split, task in rows:
        expected |= {f"VPO_Clean/{uid}/frames/{frame}", f"VPO_Clean/{uid}/labels_semantic/{mask}",
                     f"VPO_Clean/{uid}/mono_audio.wav", f"VPO_Clean/{uid}/stereo_audio.wav"}
        assert f"{uid}/labels_semantic/{mask}" in vpo_boxes
        assert uid.split("/")[0] == task
        assert not uid.isdigit() and not uid.lstrip("-+").replace(".", "", 1).isdigit()  # pandas keeps a str
        # the category list: a Python list literal of the VPO ids of the sounding classes
        assert ast.literal_eval(categories) == vpo_videos[uid.rsplit("/", 1)[-1]]["frames"][0]["sounding_classes"]
        assert re.fullmatch(r"\[\d+(, \d+)*\]|\[\]", categories)
    assert {(r[0].rsplit("/", 1)[-1], r[5]) for r in rows} == {(v, info["task"]) for v, info in vpo_videos.items()}
    on_disk = all_files(root)
    # v1s train frames 1..4 have an image and a second of audio but no mask and no csv row.
    extra = meta_files(meta) - expected
    assert extra and all("/v1s/" in path and "/labels_semantic/" not in path for path in extra)
    tables = {"AVSSData/metadata_w_silent.csv", "AVSSData/avss_bbox_orisize.json", "AVSSData/label2idx.json",
              "VPO_Clean/vpo_data_clean.csv", "VPO_Clean/vpo_bbox_orisize.json", META_NAME}
    assert on_disk == meta_files(meta) | tables


def test_vpo_tables_match_files(datasets):
    root = datasets["vpo"]
    meta = load_meta(root)
    expected: set[str] = set()
    coco_names = {coco: name for coco, name in COCO_TO_VPO.items()}
    redirected = 0
    for task, name in (("VPO-SS", "vpo_ss"), ("VPO-MS", "vpo_ms"), ("VPO-MSMI", "vpo_msmi")):
        header, rows = read_csv_rows(root / f"VPO/{task}/{name}_data_stereo.csv")
        assert header[:7] == ["cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos"]
        assert (header[7:] == ["multi_instance"]) == (task == "VPO-MSMI")
        for row in rows:
            record = dict(zip(header, row, strict=True))
            assert coco_names[int(record["cateId"])] == record["cateName"]
            assert 0.0 <= float(record["audio_pos"]) <= 1.0
            image_name = record["img_Id"].zfill(12)
            if task == "VPO-SS":  # process_coco_fn(..., mask=True) with the category folder
                image = f"VPO/{task}/data/{record['cateName']}/{image_name}.jpg"
                mask = f"VPO/{task}/mask/{record['cateName']}/{image_name}_{record['ann_Ids'].zfill(12)}.png"
            else:
                image, mask = f"VPO/{task}/data/{image_name}.jpg", f"VPO/{task}/mask/{image_name}.png"
                if task == "VPO-MSMI" and record["multi_instance"] == "0":
                    image, mask = image.replace("VPO-MSMI", "VPO-MS"), mask.replace("VPO-MSMI", "VPO-MS")
                    redirected += 1
            expected |= {image, mask, f"vggsound_bench/VGGSound/audios/{record['vgg_file']}.wav"}
    assert redirected > 0
    assert all_files(root) == expected | {META_NAME} | {
        f"VPO/{t}/{n}_data_stereo.csv" for t, n in (("VPO-SS", "vpo_ss"), ("VPO-MS", "vpo_ms"), ("VPO-MSMI", "vpo_msmi"))
    }
    assert meta_files(meta) == expected


def test_vpo_masks_use_coco_ids_and_ignore(datasets):
    root = datasets["vpo"]
    meta = load_meta(root)
    valid = {0, 255} | {c["coco_id"] for c in meta["classes"]}
    ignored = 0
    for _video, frame in frames_of(meta):
        values = np.asarray(Image.open(root / frame["files"]["VPO"]["mask"]))
        assert set(np.unique(values)) <= valid
        ignored += int(np.count_nonzero(values == 255))
    assert ignored > 0


# --------------------------------------------------------------------------------------------
# Scene statistics and cross-layout identity
# --------------------------------------------------------------------------------------------


def test_subsets_follow_their_definitions(datasets):
    meta = load_meta(datasets["ddeseg"])
    silent_visible = total_visible = 0
    for video in meta["videos"]:
        task = video["task"]
        frames = video["frames"]
        assert len(frames) == {"v1s": 5, "v1m": 5, "v2": 10}.get(task, 1)
        for frame in frames:
            total_visible += len(frame["visible"])
            silent_visible += sum(not item["sounding"] for item in frame["visible"])
            assert 1 <= len(frame["visible"]) <= 4
        if task == "v1s":
            assert all(len(f["sounding_classes"]) == (0 if f["silent"] else 1) and not f["offscreen"] for f in frames)
        if task == "v1m":
            assert len({c for f in frames for c in f["sounding_classes"]}) >= 2
        if task == "VPO-SS":
            assert len(frames[0]["sounding_classes"]) == 1
        if task in ("VPO-MS", "VPO-MSMI"):
            assert sum(item["sounding"] for item in frames[0]["visible"]) >= 2
        if task == "VPO-MSMI" and video["multi_instance"] == 1:
            classes = [o["class_id"] for o in video["objects"]]
            repeated = max(set(classes), key=classes.count)
            assert classes.count(repeated) >= 2
            states = [i["sounding"] for i in frames[0]["visible"] if i["class_id"] == repeated]
            assert any(states) and not all(states)
        assert "frames" not in video["video"] and ".jpg" not in video["video"]
    assert silent_visible / total_visible > 0.2


def test_a_video_is_the_same_in_every_layout(datasets):
    """Same seed: the AVSS videos of avsbench and ddeseg, and the VPO images of vpo and ddeseg,
    are the same bytes (frames, masks) and the same audio."""
    avsbench, ddeseg, vpo = (load_meta(datasets[k]) for k in ("avsbench", "ddeseg", "vpo"))
    dd = {(v["task"], v["index"]): v for v in ddeseg["videos"]}
    compared = 0
    for other, part, root in ((avsbench, "AVSS", datasets["avsbench"]), (vpo, "VPO", datasets["vpo"])):
        for video in other["videos"]:
            twin = dd.get((video["task"], video["index"]))
            if twin is None:
                continue
            assert twin["video"] == video["video"] and twin["objects"] == video["objects"]
            for frame, twin_frame in zip(video["frames"], twin["frames"], strict=True):
                (b,) = twin_frame["files"].values()  # a ddeseg frame lives in one part
                a = frame["files"][part]
                assert (root / a["image"]).read_bytes() == (datasets["ddeseg"] / b["image"]).read_bytes()
                if part == "AVSS":
                    if a["mask"]:
                        assert (root / a["mask"]).read_bytes() == (datasets["ddeseg"] / b["mask"]).read_bytes()
                    np.testing.assert_array_equal(second_of(root, other, a), second_of(datasets["ddeseg"], ddeseg, b))
                compared += 1
    assert compared > 0


# --------------------------------------------------------------------------------------------
# Determinism, CLI, output directory handling
# --------------------------------------------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes_for_any_worker_count(tmp_path):
    arguments = {"videos": 4, "classes": 5, "image_size": 48, "seed": 11, "tasks": ["v1s", "v2"]}
    first = tree_bytes(generate("avsbench", tmp_path / "a", **arguments))
    again = tree_bytes(generate("avsbench", tmp_path / "b", **arguments))
    parallel = tree_bytes(generate("avsbench", tmp_path / "c", workers=2, **arguments))
    other_seed = tree_bytes(generate("avsbench", tmp_path / "d", **{**arguments, "seed": 12}))
    assert first == again == parallel
    assert first[META_NAME] != other_seed[META_NAME]


def test_output_directory_is_guarded(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DDESegError, match="not empty"):
        generate("vpo", foreign, videos=3, image_size=32, classes=3)
    with pytest.raises(DDESegError, match="refusing"):
        generate("vpo", foreign, videos=3, image_size=32, classes=3, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    target = generate("vpo", tmp_path / "out", videos=3, image_size=32, classes=3)
    generate("vpo", target, videos=3, image_size=32, classes=3, seed=5, overwrite=True)
    assert load_meta(target)["params"]["seed"] == 5
    assert not list(tmp_path.glob(".*synth-tmp"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"layout": "coco"}, "--layout"),
        ({"layout": "avsbench", "tasks": ["VPO-SS"]}, "--tasks"),
        ({"layout": "vpo", "classes": 22}, "21 VPO classes"),
        ({"layout": "avsbench", "classes": 27}, "--classes"),
        ({"layout": "avsbench", "silent_rate": 1.0}, "--silent-rate"),
        ({"layout": "avsbench", "image_size": 8}, "--image-size"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, arguments, message):
    layout = arguments.pop("layout")
    with pytest.raises(DDESegError, match=message):
        generate(layout, tmp_path / "out", videos=2, **arguments)
    assert not (tmp_path / "out").exists()


def test_cli_help_and_run(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--layout", "--out", "--videos", "--classes", "--seed", "--image-size", "--tasks",
                   "--offscreen-rate", "--silent-rate", "--aspects", "--workers", "--overwrite"):
        assert option in result.output
    assert "ddeseg synth --layout avsbench --out" in result.output
    out = tmp_path / "raw"
    result = runner.invoke(
        app, ["synth", "--layout", "ddeseg", "--out", str(out), "--videos", "3", "--tasks", "v2,VPO-MS",
              "--image-size", "40", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    meta = load_meta(out)
    assert [v["task"] for v in meta["videos"]] == ["v2", "v2", "VPO-MS"]
    assert set(meta["parts"]) == {"AVSS", "VPO"}
    result = runner.invoke(app, ["synth", "--layout", "vpo", "--out", str(out), "--quiet"])
    assert isinstance(result.exception, DDESegError)


def _vggish_reference(wave: np.ndarray) -> np.ndarray:
    """VGGish log-mel examples written from the parameters, loop by loop (independent of
    `vggish_logmel`): float64 [examples, 96, 64]."""
    import math

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    edges = [mel(125.0) + i * (mel(7500.0) - mel(125.0)) / 65 for i in range(66)]
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / 400) for n in range(400)]
    weights = np.zeros((257, 64))
    for k in range(1, 257):  # bin 0 (DC) has no weight
        m = mel(k * 8000.0 / 256)
        for band in range(64):
            lo, mid, hi = edges[band], edges[band + 1], edges[band + 2]
            if lo < m <= mid:
                weights[k, band] = (m - lo) / (mid - lo)
            elif mid < m < hi:
                weights[k, band] = (hi - m) / (hi - mid)
    rows = []
    for start in range(0, len(wave) - 400 + 1, 160):
        spectrum = np.abs(np.fft.rfft(np.asarray(wave[start : start + 400]) * window, 512))
        rows.append(np.log(spectrum @ weights + 0.01))
    frames = np.array(rows)
    return np.stack([frames[i * 96 : (i + 1) * 96] for i in range(len(frames) // 96)])


def test_avsbench_log_mel_pickles_are_vggish_examples_of_the_wav(datasets):
    """S4/MS3 `audio_log_mel/*.pkl`: what the official loaders `pickle.load` (a float32 tensor
    [5, 1, 96, 64]); the values are VGGish examples of the clip's wav. (The test unpickles files
    it just generated; ddeseg itself never unpickles.)"""
    import pickle

    import torch

    root = datasets["avsbench"]
    meta = load_meta(root)
    checked = 0
    for video in meta["videos"]:
        for part in ("S4", "MS3"):
            files = video["files"].get(part)
            if not files:
                continue
            tensor = pickle.loads((root / files["log_mel"]).read_bytes())
            assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
            assert tuple(tensor.shape) == (5, 1, 96, 64)
            wave, rate = soundfile.read(root / files["audio"], dtype="float64")
            assert rate == 16_000 and wave.shape == (5 * 16_000,)
            expected = _vggish_reference(wave)[:5]  # a 5 s clip gives 5 whole examples
            assert expected.shape == (5, 96, 64)
            assert np.allclose(tensor[:, 0].numpy(), expected, atol=1e-4)
            checked += 1
    assert checked >= 2


def test_vggish_examples_of_a_tone_and_of_a_short_clip():
    from ddeseg.pipelines.sources.vggish_logmel import avsbench_examples

    t = np.arange(16_000 * 5) / 16_000
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    examples = avsbench_examples(tone)
    band = int(np.argmax(examples[0, 0].mean(axis=0)))
    # the band whose centre is nearest 1 kHz on the HTK mel scale
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)  # noqa: E731
    centres = mel(125.0) + (np.arange(64) + 1) * (mel(7500.0) - mel(125.0)) / 65
    assert abs(band - int(np.argmin(abs(centres - mel(1000.0))))) <= 1
    # 2.5 s gives 2 examples (frames 1 + (40000 - 400) // 160 = 248): the second is repeated
    short = avsbench_examples(tone[: 40_000])
    assert short.shape == (5, 1, 96, 64)
    assert all(np.array_equal(short[i], short[1]) for i in range(2, 5))
    assert np.array_equal(short[:2], examples[:2])
    assert np.allclose(avsbench_examples(np.zeros(80_000)), np.log(0.01))
