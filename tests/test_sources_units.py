"""Unit tests of the reader building blocks: paths, masks, audio, boxes, classes, shard plans."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from ddeseg.audio import fit_length
from ddeseg.classes import AVSS_CLASSES, SOUNDING_OBJECT, VPO_CLASSES, avss_palette
from ddeseg.data.boxes import box_of, sounding_boxes
from ddeseg.data.schema import IGNORE_INDEX
from ddeseg.data.shards import task_label_lut
from ddeseg.data.stream import read_shard_samples
from ddeseg.pipelines.bboxes import export_bbox_json
from ddeseg.pipelines.records import AudioSpec, ClassList, FrameRef, RecordError
from ddeseg.pipelines.shard_writer import plan_shards, write_tar
from ddeseg.pipelines.sources.common import (
    UNKNOWN,
    decode_binary_mask,
    decode_index_mask,
    decode_palette_mask,
    read_audio,
    read_image,
    safe_path,
)


def png(array: np.ndarray, mode: str | None = None) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_palette_matches_the_voc_bit_interleaving():
    palette = avss_palette(9)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[4].tolist() == [0, 0, 128]
    assert palette[8].tolist() == [64, 0, 0]
    assert len({tuple(c) for c in avss_palette(71)}) == 71  # all colours distinct


def test_palette_mask_decodes_and_names_an_unknown_colour():
    palette = avss_palette(5)
    ids = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.uint8)
    lut = np.arange(5, dtype=np.int16)
    assert np.array_equal(decode_palette_mask(png(palette[ids]), "m.png", palette, lut), ids)
    bad = palette[ids].copy()
    bad[0, 0] = (1, 2, 3)
    with pytest.raises(RecordError, match=r"unknown class colour RGB\(1, 2, 3\)") as error:
        decode_palette_mask(png(bad), "v2/x/labels_rgb/0.png", palette, lut)
    assert error.value.path == "v2/x/labels_rgb/0.png"


def test_binary_mask_accepts_0_255_and_0_1_and_rejects_grey():
    mask = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    assert decode_binary_mask(png(mask), "m", 7).tolist() == [[0, 7], [7, 0]]
    assert decode_binary_mask(png((mask // 255).astype(np.uint8)), "m", 3).tolist() == [[0, 3], [3, 0]]
    with pytest.raises(RecordError, match="besides 0/255"):
        decode_binary_mask(png(np.array([[0, 128]], dtype=np.uint8)), "m", 1)
    with pytest.raises(RecordError, match="single-channel"):
        decode_binary_mask(png(np.zeros((2, 2, 3), dtype=np.uint8)), "m", 1)


def test_index_mask_lookup_and_unknown_id():
    lut = np.full(256, UNKNOWN, dtype=np.int16)
    lut[[0, 3, 255]] = [0, 9, 255]
    values = np.array([[0, 3], [255, 3]], dtype=np.uint8)
    assert decode_index_mask(png(values, "L"), "m", lut).tolist() == [[0, 9], [255, 9]]
    with pytest.raises(RecordError, match=r"unknown class id\(s\) \[4\]"):
        decode_index_mask(png(np.array([[4]], dtype=np.uint8), "L"), "m", lut)


def test_safe_path_rejects_escapes(tmp_path):
    root = tmp_path.resolve()
    (root / "a").mkdir()
    assert safe_path(root, "a/b.jpg") == root / "a" / "b.jpg"
    for bad in ("../outside.jpg", "a/../../x", "/etc/passwd"):
        with pytest.raises(RecordError, match="escapes the dataset root"):
            safe_path(root, bad)
    (root / "link").symlink_to(tmp_path.parent)
    with pytest.raises(RecordError, match="escapes"):
        safe_path(root, "link/x.jpg")


def test_truncated_jpeg_is_a_corrupt_image(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    (tmp_path / "ok.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "bad.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    data, ext, height, width = read_image(tmp_path, "ok.jpg")
    assert data == buffer.getvalue() and ext == "jpg" and (height, width) == (32, 32)
    with pytest.raises(RecordError, match="corrupt image"):
        read_image(tmp_path, "bad.jpg")
    with pytest.raises(RecordError, match="missing image"):
        read_image(tmp_path, "none.jpg")


def test_fit_length_repeats_like_the_official_wav_repeat():
    wave = np.arange(4, dtype=np.float32)
    assert fit_length(wave, 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert fit_length(np.arange(12, dtype=np.float32), 5).tolist() == [0, 1, 2, 3, 4]


def test_read_audio_second_window_resample_and_checks(tmp_path):
    rate = 16000
    t = np.arange(3 * rate) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", np.stack([wave, wave], 1), rate, subtype="FLOAT")  # stereo
    clip = read_audio(tmp_path, AudioSpec(("a.wav",), "second", start_s=1.0), 22050, 1.0)
    assert clip.dtype == np.float32 and clip.shape == (22050,)
    expected = np.sin(2 * np.pi * 440 * (1.0 + np.arange(22050) / 22050)) * 0.3
    assert np.abs(clip[200:-200] - expected[200:-200]).max() < 1e-3  # a good resampler
    with pytest.raises(RecordError, match="empty audio at second 5"):
        read_audio(tmp_path, AudioSpec(("a.wav",), "second", start_s=5.0), 22050, 1.0)
    soundfile.write(tmp_path / "nan.wav", np.full(100, np.nan, dtype=np.float32), rate, subtype="FLOAT")
    with pytest.raises(RecordError, match="NaN"):
        read_audio(tmp_path, AudioSpec(("nan.wav",)), 22050, 1.0)
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00junk")
    with pytest.raises(RecordError, match="corrupt audio"):
        read_audio(tmp_path, AudioSpec(("junk.wav",)), 22050, 1.0)
    with pytest.raises(RecordError, match="missing audio"):
        read_audio(tmp_path, AudioSpec(("none.wav",)), 22050, 1.0)


def test_cavp_panning_mixes_down_to_half_the_sum(tmp_path):
    rate = 22050
    a = np.linspace(-0.5, 0.5, rate, dtype=np.float32)
    b = np.cos(np.arange(rate) / 10).astype(np.float32) * 0.2
    soundfile.write(tmp_path / "a.wav", a, rate, subtype="FLOAT")
    soundfile.write(tmp_path / "b.wav", b, rate, subtype="FLOAT")
    summed = read_audio(tmp_path, AudioSpec(("a.wav", "b.wav"), "head"), rate, 1.0)
    panned = read_audio(tmp_path, AudioSpec(("a.wav", "b.wav"), "head", pan=(0.2, 0.9)), rate, 1.0)
    assert np.allclose(summed, a + b, atol=1e-6)
    assert np.allclose(panned, (a + b) / 2, atol=1e-6)


def test_boxes_use_the_official_inclusive_convention():
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:5, 4:8] = 3
    mask[6, 10] = 5
    mask[0, 0] = IGNORE_INDEX
    classes, union_box, class_boxes = sounding_boxes(mask)
    assert classes == [3, 5]
    assert union_box == [4 / 20, 2 / 10, 10 / 20, 6 / 10]
    assert class_boxes == {"3": [4 / 20, 2 / 10, 7 / 20, 4 / 10], "5": [10 / 20, 6 / 10, 10 / 20, 6 / 10]}
    assert sounding_boxes(np.zeros((4, 4), np.uint8)) == ([], None, {})
    assert sounding_boxes(None) == ([], None, {})
    assert box_of(np.ones((720, 720), bool))[3] == pytest.approx(0.99861, abs=1e-5)


def test_export_bbox_json_official_form(tmp_path):
    rows = [
        {
            "task": "v2",
            "video": "abc",
            "frame": 3,
            "source_mask": "v2/abc/labels_rgb/3.png",
            "union_box": [0.1, 0.2, 0.3, 0.4],
        },
        {"task": "v1s", "video": "s", "frame": 0, "source_mask": None, "union_box": None},
        {
            "task": "VPO-MS",
            "video": "000000000001",
            "frame": 0,
            "source_mask": "VPO/VPO-MS/mask/000000000001.png",
            "union_box": [0, 0, 1, 1],
        },
    ]
    written = export_bbox_json(rows, tmp_path)
    assert [p.name for p in written] == ["avss_bbox_orisize.json", "vpo_bbox_orisize.json"]
    assert json.loads(written[0].read_text()) == {"abc_3": [0.1, 0.2, 0.3, 0.4], "s_0": None}
    assert json.loads(written[1].read_text()) == {"VPO/VPO-MS/mask/000000000001.png": [0, 0, 1, 1]}


def test_class_list_ids_are_stable_and_extras_sorted():
    classes = ClassList()
    assert classes.names[: len(AVSS_CLASSES)] == list(AVSS_CLASSES)
    assert classes.id_of("dog") == AVSS_CLASSES.index("dog")  # VPO dog shares the AVSS id
    assert classes.id_of("zebra") >= len(AVSS_CLASSES)
    classes.add_extra(SOUNDING_OBJECT)
    classes.add_extra("coyote_howling")
    classes.finalize()
    assert classes.names[-2:] == ["coyote_howling", SOUNDING_OBJECT]
    described = classes.to_json(["v1s", "v2", "VPO-SS"])
    assert described["tasks"]["v2"]["num_classes"] == 71
    vpo_lut = task_label_lut(described, "VPO-SS")
    assert [int(vpo_lut[classes.id_of(name)]) for name in VPO_CLASSES] == list(range(22))
    binary = task_label_lut(described, "v1s")
    assert binary[0] == 0 and binary[5] == 1 and binary[IGNORE_INDEX] == IGNORE_INDEX


def ref(task: str, split: str, video: str, frame: int) -> FrameRef:
    return FrameRef(task, task, split, video, frame, f"{video}/{frame}.jpg", None, AudioSpec(("a.wav",)))


def test_plan_shards_is_independent_of_input_order():
    refs = [ref("v2", s, f"vid{v}", f) for s in ("train", "test") for v in range(5) for f in range(3)]
    shuffled = list(refs)
    np.random.default_rng(0).shuffle(shuffled)
    plan_a = [(j.name, [r.key for r in j.refs]) for j in plan_shards(refs, 4)]
    plan_b = [(j.name, [r.key for r in j.refs]) for j in plan_shards(shuffled, 4)]
    assert plan_a == plan_b
    assert plan_a[0][0] == "v2/test/shard-000000.tar" and len(plan_a) == 8


def test_tar_bytes_are_deterministic_and_read_back(tmp_path):
    samples = [
        {"__key__": f"v2-a-{i:03d}", "meta.json": b"{}", "audio.npy": bytes([i]) * 10} for i in range(3)
    ]
    digest_a, _ = write_tar(tmp_path / "a.tar", samples)
    digest_b, _ = write_tar(tmp_path / "b.tar", samples)
    assert digest_a == digest_b
    back = list(read_shard_samples(tmp_path / "a.tar"))
    assert [s["__key__"] for s in back] == ["v2-a-000", "v2-a-001", "v2-a-002"]
    assert back[2]["audio.npy"] == bytes([2]) * 10
    assert not list(tmp_path.glob(".*tmp*"))


def test_digital_silence_under_a_sounding_mask_is_rejected(tmp_path):
    """An all-zero wav is fine for frames with an empty mask (silent) and a reject for frames
    whose mask has sounding pixels (silent by error)."""
    from ddeseg.config import Config
    from ddeseg.pipelines.records import FrameRecord, Reject
    from ddeseg.pipelines.sources.common import open_source

    root = tmp_path / "avss"
    video = root / "v2" / "vid"
    (video / "frames").mkdir(parents=True)
    (video / "labels_semantic").mkdir()
    (root / "label2idx.json").write_text(json.dumps({"background": 1, "a": 2, "b": 3}))
    (root / "metadata.csv").write_text("vid,uid,s_min,s_sec,a_obj,split,label\nvid,vid,0,0,a,test,v2\n")
    for frame in range(10):
        Image.new("RGB", (16, 12)).save(video / "frames" / f"{frame}.jpg")
        mask = np.zeros((12, 16), np.uint8)
        if frame % 2:
            mask[2:5, 3:9] = 2
        Image.fromarray(mask, mode="L").save(video / "labels_semantic" / f"{frame}.png")
    soundfile.write(video / "audio.wav", np.zeros(16000 * 10, np.float32), 16000)
    source = open_source("avsbench", root, None, Config())
    items = list(source.records())
    rejected = [item for item in items if isinstance(item, Reject)]
    kept = [item for item in items if isinstance(item, FrameRecord)]
    assert [r.key for r in rejected] == [f"v2-vid-{f:03d}" for f in range(1, 10, 2)]
    assert all("all zeros but the mask has sounding pixels" in r.reason for r in rejected)
    assert [r.ref.frame for r in kept] == [0, 2, 4, 6, 8] and all(r.mask is not None for r in kept)


def test_s4_categories_map_to_avss_names_or_become_extra_classes(tmp_path):
    """Original S4 (binary masks, no label2idx): `dog_barking` is the AVSS `dog`, a category with
    no clear AVSS name keeps its own (extra) class; train frames 2..5 have no mask."""
    from ddeseg.config import Config
    from ddeseg.pipelines.records import FrameRecord
    from ddeseg.pipelines.sources.common import open_source

    base = tmp_path / "Single-source"
    rows = ["name,start,category,split"]
    for name, category, split in (("a1", "dog_barking", "test"), ("b2", "coyote_howling", "train")):
        rows.append(f"{name},0,{category},{split}")
        frames = base / "s4_data" / "visual_frames" / split / category / name
        masks = base / "s4_data" / "gt_masks" / split / category / name
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for number in range(1, 6):
            Image.new("RGB", (16, 16)).save(frames / f"{name}_{number}.png")
            if split == "test" or number == 1:
                mask = np.zeros((16, 16), np.uint8)
                mask[4:8, 4:8] = 255
                Image.fromarray(mask, mode="L").save(masks / f"{name}_{number}.png")
        audio = base / "s4_data" / "audio_wav" / split / category
        audio.mkdir(parents=True)
        soundfile.write(audio / f"{name}.wav", np.full(16000 * 5, 0.1, np.float32), 16000)
    (base / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")
    source = open_source("avsbench", tmp_path, ["v1s"], Config())
    records = [item for item in source.records() if isinstance(item, FrameRecord)]
    assert len(records) == 10
    ids = {
        (r.ref.video, r.ref.frame): (None if r.mask is None else sorted(set(np.unique(r.mask)) - {0}))
        for r in records
    }
    dog, coyote = source.classes.id_of("dog"), source.classes.id_of("coyote_howling")
    assert dog == AVSS_CLASSES.index("dog") and coyote >= source.classes.base_count
    assert ids["a1", 3] == [dog] and ids["b2", 0] == [coyote] and ids["b2", 1] is None
    assert source.classes.to_json(["v1s"])["names"][coyote] == "coyote_howling"
