"""Writers of the synthetic dataset in the real raw layouts (see `docs/datasets.md`).

Each writer puts one rendered video (or VPO image) of `synthetic_scenes` on disk in one release
part and returns what the orchestrator (`synthetic`) needs: the files of each frame (for
`synth_meta.json`), the csv rows and the bbox-json entries of that part. Writers draw no random
numbers: the same scene gives the same bytes in every layout.

Parts (folder relative to RAW_DIR):

| layout   | part | folder           | what                                                        |
|----------|------|------------------|-------------------------------------------------------------|
| avsbench | S4   | `Single-source/` | AVSBench-object single source (task v1s), + `audio_log_mel/*.pkl` |
| avsbench | MS3  | `Multi-sources/` | AVSBench-object multi sources (task v1m), + `audio_log_mel/*.pkl` |
| avsbench | AVSS | `.`              | AVSBench-semantic: `metadata.csv`, `label2idx.json`, v1s/v1m/v2 |
| ddeseg   | AVSS | `AVSSData/`      | DDESeg's reorganised AVSS (`metadata_w_silent.csv`, ...)    |
| ddeseg   | VPO  | `VPO_Clean/`     | DDESeg's reorganised VPO (`vpo_data_clean.csv`, ...)        |
| vpo      | VPO  | `.`              | the VPO release: `VPO/VPO-*/` and `vggsound_bench/`         |
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddeseg.classes import VPO_CLASSES
from ddeseg.pipelines.sources.vggish_logmel import avsbench_examples, pickled_tensor

SAMPLE_RATE_HZ = 16_000  # AVSBench wavs are written at 16 kHz (preprocess_s4.py / _ms3.py)
VGG_CLIP_S = 10  # VGGSound clips are 10 s
VPO_WINDOW_S = 3  # CAVP's centred crop (config_vpo_*.py: audio_len = 3.0)
JPEG_QUALITY = 90
IGNORE = 255

PART_ROOTS = {
    "avsbench": {"S4": "Single-source", "MS3": "Multi-sources", "AVSS": "."},
    "ddeseg": {"AVSS": "AVSSData", "VPO": "VPO_Clean"},
    "vpo": {"VPO": "."},
}

VPO_CSV = {"VPO-SS": "vpo_ss_data_stereo.csv", "VPO-MS": "vpo_ms_data_stereo.csv", "VPO-MSMI": "vpo_msmi_data_stereo.csv"}
VPO_AUDIO_DIR = "vggsound_bench/VGGSound/audios"

CSV_HEADERS = {
    "Single-source/s4_meta_data.csv": ["name", "start", "category", "split"],
    "Multi-sources/ms3_meta_data.csv": ["video_id", "split"],
    "metadata.csv": ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"],
    "AVSSData/metadata_w_silent.csv": ["vid", "uid", "s_min", "s_sec", "split", "label", "silent"],
    # the 6 columns of DDESeg's released file as third-party readers read it (docs/datasets.md)
    "VPO_Clean/vpo_data_clean.csv": ["uid", "frame", "mask", "category", "split", "type"],
    **{
        f"VPO/{task}/{name}": ["cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos"]
        + (["multi_instance"] if task == "VPO-MSMI" else [])
        for task, name in VPO_CSV.items()
    },
}
BBOX_JSONS = ("AVSSData/avss_bbox_orisize.json", "VPO_Clean/vpo_bbox_orisize.json")


# --------------------------------------------------------------------------------------------
# Encoders (fixed settings, no metadata: same input, same bytes)
# --------------------------------------------------------------------------------------------


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False, progressive=False
    )
    return buffer.getvalue()


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 [H, W] -> 'L' PNG, uint8 [H, W, 3] -> 'RGB' PNG."""
    mode = "L" if array.ndim == 2 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", optimize=False, compress_level=compress_level)
    return buffer.getvalue()


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")


def encode_wav(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE_HZ) -> bytes:
    """int16 [samples] (mono) or [samples, 2] (stereo) -> 16-bit PCM RIFF/WAVE bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
    return buffer.getvalue()


def write_bytes(root: Path, relative: str, data: bytes) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return relative


def join(*parts: str) -> str:
    """Relative path inside RAW_DIR ('.' parts dropped)."""
    return "/".join(part for part in parts if part not in (".", ""))


# --------------------------------------------------------------------------------------------
# What a writer gets and gives
# --------------------------------------------------------------------------------------------


@dataclass
class VideoContent:
    """One rendered scene, ready to be written in any layout.

    `class_maps[f]`: uint8 [H, W] class ids of the sounding visible pixels (0 elsewhere).
    `annotated[f]`: the frame has a mask in the release (AVSBench v1s train: frame 0 only).
    `audio`: int16 [seconds * 16 kHz] (AVS tasks). `clips`: VPO tasks, one int16 [10 s * 16 kHz]
    per sounding instance, with `audio_pos` (CAVP pan: left gain 1 - p, right gain p).
    """

    task: str
    split: str
    ids: dict[str, Any]
    width: int
    height: int
    frames: np.ndarray  # uint8 [F, H, W, 3]
    class_maps: np.ndarray  # uint8 [F, H, W]
    annotated: list[bool]
    silent: list[bool]
    sounding_classes: list[list[int]]  # per frame, visible sounding class ids (sorted)
    class_names: dict[int, str]
    audio: np.ndarray | None = None
    clips: list[dict[str, Any]] = field(default_factory=list)
    multi_instance: int | None = None


@dataclass
class Written:
    """What one writer put on disk for one video."""

    frame_files: list[dict[str, Any]]  # per frame: {"image", "mask", ...} (relative paths)
    video_files: dict[str, Any]
    rows: dict[str, list[list[Any]]] = field(default_factory=dict)  # csv path -> rows
    boxes: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # json path -> entries


def normalised_box(mask: np.ndarray) -> list[float]:
    """DDESeg's bbox-json form of the sounding region: `[x_min / W, y_min / H, x_max / W,
    y_max / H]` with inclusive max pixel indices (as the example in DDESeg's
    data_augmentation.py: 0.9986 = 719 / 720). An empty mask gives the whole frame."""
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 1.0, 1.0]
    return [int(cols[0]) / width, int(rows[0]) / height, int(cols[-1]) / width, int(rows[-1]) / height]


def label2idx(class_names: list[str]) -> dict[str, int]:
    """AVSS `label2idx.json`: background first, then the classes in alphabetical order, values
    counting from 1 (as the file DDESeg ships). A class's mask id is its value minus 1."""
    names = sorted(class_names)
    if names != list(class_names):
        raise ValueError("synthetic class names must already be in alphabetical order")
    return {name: index + 1 for index, name in enumerate(["background", *names])}


# --------------------------------------------------------------------------------------------
# avsbench
# --------------------------------------------------------------------------------------------


def _log_mel_pickle(pcm: np.ndarray) -> bytes:
    """The release's `audio_log_mel/*.pkl` of a 16 kHz int16 clip: a pickled float32 torch
    tensor `[5, 1, 96, 64]` of VGGish log-mel examples (`vggish_logmel`), for the official
    S4/MS3 loaders; ddeseg's prepare never reads it."""
    return pickled_tensor(avsbench_examples(pcm.astype(np.float32) / 32768.0))


def write_s4(root: Path, video: VideoContent) -> Written:
    """`Single-source/`: PNG frames `{name}_{1..5}.png`, 0/255 masks, one 16 kHz wav."""
    name, split = video.ids["name"], video.split
    category = video.class_names[video.ids["category_class"]]
    base = "Single-source/s4_data"
    frames = []
    for index in range(len(video.frames)):
        number = index + 1
        image = write_bytes(
            root,
            f"{base}/visual_frames/{split}/{category}/{name}/{name}_{number}.png",
            encode_png(video.frames[index], compress_level=1),
        )
        mask = None
        if video.annotated[index]:
            binary = np.where(video.class_maps[index] > 0, 255, 0).astype(np.uint8)
            mask = write_bytes(
                root, f"{base}/gt_masks/{split}/{category}/{name}/{name}_{number}.png", encode_png(binary)
            )
        frames.append({"image": image, "mask": mask, "audio_start_s": float(index)})
    audio = write_bytes(root, f"{base}/audio_wav/{split}/{category}/{name}.wav", encode_wav(video.audio))
    log_mel = write_bytes(root, f"{base}/audio_log_mel/{split}/{category}/{name}.pkl", _log_mel_pickle(video.audio))
    for entry in frames:
        entry["audio"] = audio
    row = [name, video.ids["s4_start"], category, split]
    return Written(frames, {"audio": audio, "log_mel": log_mel, "csv": "Single-source/s4_meta_data.csv"},
                   rows={"Single-source/s4_meta_data.csv": [row]})


def write_ms3(root: Path, video: VideoContent) -> Written:
    """`Multi-sources/`: frames `visual_frames/{name}/{name}.mp4_{1..5}.png` (no split folder)."""
    name, split = video.ids["name"], video.split
    base = "Multi-sources/ms3_data"
    frames = []
    for index in range(len(video.frames)):
        number = index + 1
        image = write_bytes(
            root, f"{base}/visual_frames/{name}/{name}.mp4_{number}.png", encode_png(video.frames[index], 1)
        )
        binary = np.where(video.class_maps[index] > 0, 255, 0).astype(np.uint8)
        mask = write_bytes(root, f"{base}/gt_masks/{split}/{name}/{name}_{number}.png", encode_png(binary))
        frames.append({"image": image, "mask": mask, "audio_start_s": float(index)})
    audio = write_bytes(root, f"{base}/audio_wav/{split}/{name}.wav", encode_wav(video.audio))
    log_mel = write_bytes(root, f"{base}/audio_log_mel/{split}/{name}.pkl", _log_mel_pickle(video.audio))
    for entry in frames:
        entry["audio"] = audio
    return Written(frames, {"audio": audio, "log_mel": log_mel, "csv": "Multi-sources/ms3_meta_data.csv"},
                   rows={"Multi-sources/ms3_meta_data.csv": [[name, split]]})


def _audible_names(video: VideoContent) -> str:
    heard = sorted({c for classes in video.sounding_classes for c in classes})
    return ", ".join(video.class_names[c] for c in heard)


def write_avss(root: Path, video: VideoContent, palette: np.ndarray) -> Written:
    """AVSBench-semantic: `{label}/{uid}/frames/{i}.jpg`, `labels_rgb/{i}.png` (palette colours),
    `labels_semantic/{i}.png` (class ids), `audio.wav`."""
    uid, label = video.ids["uid"], video.task
    base = f"{label}/{uid}"
    frames = []
    for index in range(len(video.frames)):
        image = write_bytes(root, f"{base}/frames/{index}.jpg", encode_jpeg(video.frames[index]))
        mask = mask_rgb = None
        if video.annotated[index]:
            class_map = video.class_maps[index]
            mask_rgb = write_bytes(root, f"{base}/labels_rgb/{index}.png", encode_png(palette[class_map]))
            mask = write_bytes(root, f"{base}/labels_semantic/{index}.png", encode_png(class_map))
        frames.append({"image": image, "mask": mask, "mask_rgb": mask_rgb, "audio_start_s": float(index)})
    audio = write_bytes(root, f"{base}/audio.wav", encode_wav(video.audio))
    for entry in frames:
        entry["audio"] = audio
    ids = video.ids
    row = [ids["vid"], uid, ids["s_min"], ids["s_sec"], _audible_names(video), video.split, label]
    return Written(frames, {"audio": audio, "csv": "metadata.csv"}, rows={"metadata.csv": [row]})


# --------------------------------------------------------------------------------------------
# ddeseg
# --------------------------------------------------------------------------------------------


def write_ddeseg_avss(root: Path, video: VideoContent) -> Written:
    """`AVSSData/{subset}/{uid}/frames/{i}.jpg`, `labels_semantic/{i}.png`, `audios/{i}.wav`;
    one csv row and one bbox entry per annotated second."""
    uid, subset = video.ids["uid"], video.task
    base = f"AVSSData/{subset}/{uid}"
    csv_path, json_path = "AVSSData/metadata_w_silent.csv", "AVSSData/avss_bbox_orisize.json"
    frames, rows, boxes = [], [], {}
    for index in range(len(video.frames)):
        image = write_bytes(root, f"{base}/frames/{index}.jpg", encode_jpeg(video.frames[index]))
        second = video.audio[index * SAMPLE_RATE_HZ : (index + 1) * SAMPLE_RATE_HZ]
        audio = write_bytes(root, f"{base}/audios/{index}.wav", encode_wav(second))
        mask = None
        if video.annotated[index]:
            class_map = video.class_maps[index]
            mask = write_bytes(root, f"{base}/labels_semantic/{index}.png", encode_png(class_map))
            key = f"{uid}_{index}"
            ids = video.ids
            rows.append([ids["vid"], key, ids["s_min"], ids["s_sec"], video.split, subset, int(video.silent[index])])
            boxes[key] = normalised_box(class_map > 0)
        frames.append({"image": image, "mask": mask, "audio": audio, "audio_start_s": 0.0})
    return Written(frames, {"csv": csv_path, "bbox_json": json_path}, rows={csv_path: rows}, boxes={json_path: boxes})


def _vpo_window(clip: np.ndarray) -> np.ndarray:
    """CAVP's crop: `VPO_WINDOW_S` seconds centred on the clip (float, from the int16 clip)."""
    length = VPO_WINDOW_S * SAMPLE_RATE_HZ
    start = clip.shape[0] // 2 - length // 2
    return clip[start : start + length].astype(np.float32) / 32767.0


def vpo_mixes(video: VideoContent) -> tuple[np.ndarray, np.ndarray]:
    """(mono int16 [n], stereo int16 [n, 2]) of an image's sources, mixed as CAVP's loaders do:
    the sum of the centred crops; stereo pans each source (left 1 - p, right p) first."""
    windows = [_vpo_window(source["pcm"]) for source in video.clips]
    positions = [source["audio_pos"] for source in video.clips]
    mono = np.sum(windows, axis=0)
    stereo = np.sum([np.stack([w * (1.0 - p), w * p], axis=1) for w, p in zip(windows, positions, strict=True)], axis=0)
    peak = max(float(np.max(np.abs(mono))), float(np.max(np.abs(stereo))))
    scale = 0.95 / peak if peak > 0.95 else 1.0
    return to_pcm16(mono * scale), to_pcm16(stereo * scale)


def write_ddeseg_vpo(root: Path, video: VideoContent) -> Written:
    """`VPO_Clean/{type}/{id}/frames/{frame}`, `labels_semantic/{mask}` (VPO class ids 0..21),
    `mono_audio.wav`, `stereo_audio.wav`; one csv row of the released form: uid `{type}/{id}`
    (a string for pandas: it has a `/`), frame, mask, the
    category list (`[3, 7]`, VPO ids of the sounding classes), split, type."""
    uid = video.ids["vpo_uid"]
    name = uid.rsplit("/", 1)[-1]
    base = f"VPO_Clean/{uid}"
    frame_name, mask_name = f"{name}.jpg", f"{name}.png"
    class_map = video.class_maps[0]
    image = write_bytes(root, f"{base}/frames/{frame_name}", encode_jpeg(video.frames[0]))
    mask = write_bytes(root, f"{base}/labels_semantic/{mask_name}", encode_png(class_map))
    mono, stereo = vpo_mixes(video)
    mono_path = write_bytes(root, f"{base}/mono_audio.wav", encode_wav(mono))
    stereo_path = write_bytes(root, f"{base}/stereo_audio.wav", encode_wav(stereo))
    csv_path, json_path = "VPO_Clean/vpo_data_clean.csv", "VPO_Clean/vpo_bbox_orisize.json"
    files = {"image": image, "mask": mask, "audio": mono_path, "audio_stereo": stereo_path, "audio_start_s": 0.0}
    categories = str(sorted(int(c) for c in video.sounding_classes[0]))  # "[3, 7]", as the release
    row = [uid, frame_name, mask_name, categories, video.split, video.task]
    # DDESeg looks boxes up by the mask path; ours are relative to the VPO_Clean folder.
    key = f"{uid}/labels_semantic/{mask_name}"
    return Written([files], {"csv": csv_path, "bbox_json": json_path}, rows={csv_path: [row]},
                   boxes={json_path: {key: normalised_box(class_map > 0)}})


# --------------------------------------------------------------------------------------------
# vpo (the original release)
# --------------------------------------------------------------------------------------------


def coco_mask(class_map: np.ndarray, coco_ids: np.ndarray) -> np.ndarray:
    """VPO release mask: COCO category ids of the sounding objects, a one-pixel ring of 255
    (ignore) around them, 0 elsewhere."""
    sounding = class_map > 0
    grown = sounding.copy()
    grown[1:] |= sounding[:-1]
    grown[:-1] |= sounding[1:]
    grown[:, 1:] |= sounding[:, :-1]
    grown[:, :-1] |= sounding[:, 1:]
    mask = coco_ids[class_map].astype(np.uint8)
    mask[grown & ~sounding] = IGNORE
    return mask


def write_vpo(root: Path, video: VideoContent, coco_ids: np.ndarray) -> Written:
    """`VPO/VPO-*/data/...jpg`, `mask/...png` (COCO ids), csv rows (one per sounding source),
    and each source's 10 s VGGSound-style clip in `vggsound_bench/VGGSound/audios/`.

    VPO-MSMI images with `multi_instance == 0` live in the VPO-MS folder: CAVP's loader
    rewrites their paths from `VPO-MSMI` to `VPO-MS`.
    """
    task = video.task
    img_id = video.ids["img_id"]
    image_name = f"{img_id:012d}"
    folder = "VPO-MS" if task == "VPO-MSMI" and video.multi_instance == 0 else task
    mask_array = coco_mask(video.class_maps[0], coco_ids)
    if task == "VPO-SS":
        source = video.clips[0]
        category = VPO_CLASSES[source["class_id"]]
        image_rel = f"VPO/{folder}/data/{category}/{image_name}.jpg"
        mask_rel = f"VPO/{folder}/mask/{category}/{image_name}_{source['ann_id']:012d}.png"
    else:
        image_rel = f"VPO/{folder}/data/{image_name}.jpg"
        mask_rel = f"VPO/{folder}/mask/{image_name}.png"
    image = write_bytes(root, image_rel, encode_jpeg(video.frames[0]))
    mask = write_bytes(root, mask_rel, encode_png(mask_array))
    rows, sources = [], []
    for source in video.clips:
        audio = write_bytes(root, f"{VPO_AUDIO_DIR}/{source['vgg_file']}.wav", encode_wav(source["pcm"]))
        class_id = source["class_id"]
        row = [VPO_CLASSES[class_id], img_id, source["ann_id"], int(coco_ids[class_id]), source["vgg_file"],
               video.split, source["audio_pos"]]
        if task == "VPO-MSMI":
            row.append(video.multi_instance)
        rows.append(row)
        sources.append({"path": audio, "instance": source["instance"], "class_id": class_id,
                        "ann_id": source["ann_id"], "audio_pos": source["audio_pos"]})
    csv_path = f"VPO/{task}/{VPO_CSV[task]}"
    files = {"image": image, "mask": mask, "audio_sources": sources}
    return Written([files], {"csv": csv_path}, rows={csv_path: rows})
