"""`ddeseg synth`: a deterministic synthetic audio-visual segmentation dataset, written in the
real raw layouts (`avsbench`, `ddeseg`, `vpo`; see `docs/datasets.md`) so that the real
readers are what gets tested.

Scenes and sounds come from `synthetic_scenes`, files from `synthetic_layouts`. Video `j` of
task `t` is drawn from its own random stream `SeedSequence([seed, TASK_CODES[t], j])`, so a
video is the same in every layout (and whatever the other tasks or the number of workers): the
AVSS videos of `--layout avsbench` and `--layout ddeseg` are identical frames, masks and audio.
Same arguments, same bytes: fixed JPEG/PNG settings, plain 16-bit PCM wavs, no timestamps,
sorted json, no absolute paths in any file.

synth_meta.json (at RAW_DIR root; ground truth for tests, never read by the ingestion code)
-------------------------------------------------------------------------------------------
All paths are relative to RAW_DIR with `/` separators. Frames count from 0 (`frame` f covers
seconds [f, f + 1) of the video's audio), whatever the layout's own file numbering.

    {
      "format": "ddeseg-synth-meta", "version": 1,
      "layout": "avsbench" | "ddeseg" | "vpo",
      "params": {"videos", "classes", "seed", "image_size", "tasks", "offscreen_rate",
                 "silent_rate", "aspects"},
      "sample_rate_hz": 16000,              # of every wav written
      "vpo_clip_s": 10, "vpo_window_s": 3,  # VGGSound-style clip length, CAVP's centred crop
      "parts": {PART: {"root": folder, "mask_encoding": ENC, ...}},  # the release parts written
      "classes": [{"id": 1.., "name", "shape", "texture", "rgb": [r, g, b], "timbre",
                   "band_hz": [lo, hi],      # the class's sound lives in this band
                   "vpo_name": str | null, "coco_id": int | null,  # null when id > 21
                   "avss_name": str}],       # its name in the avsbench layout (real label2idx)
      "videos": [VIDEO, ...]                # ordered by task (params.tasks order), then index
    }

    VIDEO = {
      "task": "v1s" | "v1m" | "v2" | "VPO-SS" | "VPO-MS" | "VPO-MSMI",
      "index": j,                           # position within its task
      "split": "train" | "val" | "test",
      "video": str,                         # canonical id: AVSS uid, or the VPO image id (12 digits)
      "ids": {...},                         # every id the layouts use: vid, uid, s_min, s_sec,
                                            # name (S4/MS3), img_id, vpo_uid, ...
      "width": W, "height": H, "num_frames": F, "duration_s": F (AVS) | 10 (VPO clips),
      "multi_instance": 0 | 1 | null,       # VPO-MSMI only (0: files live in the VPO-MS folder)
      "objects": [{"instance": i, "class_id", "name", "ann_id": int | null}],  # drawn in this order
      "offscreen_classes": [class ids],     # classes that sound in the video without being seen
      "files": {PART: {"csv": path, "audio": path?, "bbox_json": path?}},
      "frames": [FRAME, ...]
    }

    FRAME = {
      "frame": f, "start_s": f, "end_s": f + 1,
      "silent": bool,                       # nothing sounds in this second (not even off-screen)
      "annotated": bool,                    # the release has a mask for this frame
      "visible": [{"instance", "class_id", "sounding": bool, "area_px": int,
                   "box": [x_min, y_min, x_max, y_max]}],  # inclusive pixels; area_px > 0 only
      "sounding_classes": [ids],            # visible AND sounding: exactly the mask's classes
      "offscreen": [ids],                   # sounding in this second, not visible
      "files": {PART: {"image": path, "mask": path | null (not annotated),
                       "mask_rgb": path | null,      # avsbench AVSS colour mask only
                       "audio": path, "audio_start_s": s,  # this second = audio[s, s + 1)
                       "audio_stereo": path,         # ddeseg VPO only
                       "audio_sources": [{"path", "instance", "class_id", "ann_id",
                                          "audio_pos"}]}}  # vpo layout: one 10 s clip per source
    }

PART keys: `avsbench`: `S4` (v1s), `MS3` (v1m), `AVSS` (v1s, v1m, v2: the same v1s/v1m videos
are written in both their AVSBench-object part and AVSS); `ddeseg`: `AVSS`, `VPO`; `vpo`: `VPO`.
Mask encodings (`parts[PART].mask_encoding`): `binary-255` (S4, MS3: 0/255), `class-id` (AVSS
`labels_semantic`: synthetic class ids 0..C), `palette-rgb` (AVSS `labels_rgb`, the AVSS palette
of the class id), `vpo-id` (ddeseg VPO: index in the 22 VPO classes, = class id), `coco-id`
(vpo release: COCO category ids, 255 ignore ring one pixel wide around each sounding object).
"""

from __future__ import annotations

import csv
import io
import json
import os
import string
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ddeseg.classes import AVSS_CLASSES, AVSS_TASKS, COCO_TO_VPO, SPLITS, VPO_CLASSES, VPO_TASKS, avss_palette
from ddeseg.errors import DDESegError
from ddeseg.fileio import building_directory
from ddeseg.pipelines.synthetic import layouts as layouts
from ddeseg.pipelines.synthetic import scenes as scenes

LAYOUTS = ("avsbench", "ddeseg", "vpo")
LAYOUT_TASKS = {"avsbench": AVSS_TASKS, "ddeseg": AVSS_TASKS + VPO_TASKS, "vpo": VPO_TASKS}
TASK_CODES = {"v1s": 1, "v1m": 2, "v2": 3, "VPO-SS": 4, "VPO-MS": 5, "VPO-MSMI": 6}
SPLIT_CYCLE = ("train", "val", "test", "train", "train")  # 60 / 20 / 20, all three from 3 videos
DEFAULT_ASPECTS = (1.0, 4 / 3, 16 / 9)
MSMI_SINGLE_INSTANCE_EVERY = 4  # every 4th VPO-MSMI image has multi_instance == 0 (files under VPO-MS)
META_NAME = "synth_meta.json"
ID_ALPHABET = string.ascii_letters + string.digits + "-_"

PART_INFO = {
    "avsbench": {
        "S4": {"tasks": ["v1s"], "mask_encoding": "binary-255", "csv": "Single-source/s4_meta_data.csv"},
        "MS3": {"tasks": ["v1m"], "mask_encoding": "binary-255", "csv": "Multi-sources/ms3_meta_data.csv"},
        "AVSS": {"tasks": list(AVSS_TASKS), "mask_encoding": "class-id", "mask_rgb_encoding": "palette-rgb",
                 "csv": "metadata.csv", "label2idx": "label2idx.json"},
    },
    "ddeseg": {
        "AVSS": {"tasks": list(AVSS_TASKS), "mask_encoding": "class-id", "csv": "AVSSData/metadata_w_silent.csv",
                 "label2idx": "AVSSData/label2idx.json", "bbox_json": "AVSSData/avss_bbox_orisize.json"},
        "VPO": {"tasks": list(VPO_TASKS), "mask_encoding": "vpo-id", "csv": "VPO_Clean/vpo_data_clean.csv",
                "bbox_json": "VPO_Clean/vpo_bbox_orisize.json"},
    },
    "vpo": {
        "VPO": {"tasks": list(VPO_TASKS), "mask_encoding": "coco-id", "ignore_value": layouts.IGNORE,
                "csv": {task: f"VPO/{task}/{name}" for task, name in layouts.VPO_CSV.items()},
                "audio_dir": layouts.VPO_AUDIO_DIR},
    },
}


@dataclass(frozen=True)
class SynthConfig:
    """What `generate` makes; every field is recorded in `synth_meta.json` (`params`)."""

    layout: str
    videos: int = 40
    classes: int = 8
    seed: int = 0
    image_size: int = 224
    tasks: tuple[str, ...] = ()
    offscreen_rate: float = 0.2
    silent_rate: float = 0.1
    aspects: tuple[float, ...] = DEFAULT_ASPECTS

    def validate(self) -> SynthConfig:
        if self.layout not in LAYOUTS:
            raise DDESegError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        allowed = LAYOUT_TASKS[self.layout]
        tasks = self.tasks or allowed
        unknown = [task for task in tasks if task not in allowed]
        if unknown or len(set(tasks)) != len(tasks):
            raise DDESegError(
                f"--tasks for layout {self.layout} must be distinct values among {', '.join(allowed)}, got {', '.join(tasks)}"
            )
        if not 1 <= self.videos <= 1_000_000:
            raise DDESegError(f"--videos must be in 1..1000000, got {self.videos}")
        max_classes = len(VPO_CLASSES) - 1 if any(task in VPO_TASKS for task in tasks) else scenes.MAX_CLASSES
        if not 2 <= self.classes <= max_classes:
            reason = " (VPO tasks map classes onto the 21 VPO classes)" if max_classes < scenes.MAX_CLASSES else ""
            raise DDESegError(f"--classes must be in 2..{max_classes}{reason}, got {self.classes}")
        if not 32 <= self.image_size <= 2048:
            raise DDESegError(f"--image-size must be in 32..2048 pixels, got {self.image_size}")
        for name, rate in (("--offscreen-rate", self.offscreen_rate), ("--silent-rate", self.silent_rate)):
            if not 0.0 <= rate <= 1.0:
                raise DDESegError(f"{name} must be in [0, 1], got {rate}")
        if self.silent_rate >= 1.0:
            raise DDESegError("--silent-rate must be below 1 (a video needs a sounding second)")
        if not self.aspects or any(not 0.5 <= aspect <= 3.0 for aspect in self.aspects):
            raise DDESegError(f"--aspects must be width/height ratios in [0.5, 3], got {self.aspects}")
        return SynthConfig(**{**asdict(self), "tasks": tuple(tasks)})


@dataclass(frozen=True)
class VideoPlan:
    task: str
    index: int
    split: str


def plan_videos(config: SynthConfig) -> list[VideoPlan]:
    """`config.videos` spread over the tasks (the first tasks get the remainder); the split of the
    `j`-th video of a task cycles through `SPLIT_CYCLE`."""
    plans = []
    count = len(config.tasks)
    for position, task in enumerate(config.tasks):
        for index in range(config.videos // count + (1 if position < config.videos % count else 0)):
            plans.append(VideoPlan(task, index, SPLIT_CYCLE[index % len(SPLIT_CYCLE)]))
    return plans


def _random_id(rng: np.random.Generator, length: int = 11) -> str:
    """YouTube-like id; never contains `frames` or `.jpg` (the official loaders substitute them)."""
    while True:
        text = "".join(ID_ALPHABET[i] for i in rng.integers(len(ID_ALPHABET), size=length))
        if "frames" not in text.lower():
            return text


def _coco_ids(classes: int) -> np.ndarray:
    """uint8 [classes + 1]: COCO category id of each synthetic class (0 for background): class k
    is VPO class k (`VPO_CLASSES`, CAVP's index_table_coco order)."""
    by_name = {name: coco for coco, name in COCO_TO_VPO.items()}
    ids = np.zeros(classes + 1, dtype=np.uint8)
    for class_id in range(1, min(classes, len(VPO_CLASSES) - 1) + 1):
        ids[class_id] = by_name[VPO_CLASSES[class_id]]
    return ids


def _ann_id(ids: dict[str, Any], instance: int) -> int | None:
    """COCO-style annotation id of a VPO instance (None for AVS videos)."""
    return ids["img_id"] * 10 + instance + 1 if "img_id" in ids else None


def _content(config: SynthConfig, plan: VideoPlan, identities: list[scenes.ClassIdentity]):
    """Draw, render and sound one video. Returns (scene, VideoContent, per-frame stats)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, TASK_CODES[plan.task], plan.index]))
    vid = _random_id(rng)
    start_s = int(rng.integers(0, 600))
    vgg = [f"{_random_id(rng)}_{int(rng.integers(0, 300)):06d}" for _ in range(4)]
    aspect = config.aspects[int(rng.integers(len(config.aspects)))]
    multi_instance = None
    if plan.task == "VPO-MSMI":
        multi_instance = int(plan.index % MSMI_SINGLE_INSTANCE_EVERY != MSMI_SINGLE_INSTANCE_EVERY - 1)
    height = config.image_size
    # AVSBench-object frames are square (224 x 224 in the release); v2 and VPO images are not.
    width = height if plan.task in ("v1s", "v1m") else max(32, 2 * round(height * aspect / 2))
    if plan.task in AVSS_TASKS:
        scene = scenes.sample_avs_scene(
            rng, plan.task, config.classes, width, height, config.offscreen_rate, config.silent_rate
        )
    else:
        scene = scenes.sample_vpo_scene(rng, plan.task, config.classes, width, height, bool(multi_instance))
    frames, owner = scenes.render_scene(rng, scene, identities)
    count = len(scene.objects)
    class_of = np.array([0] + [obj.class_id for obj in scene.objects], dtype=np.uint8)
    class_maps = np.empty(owner.shape, dtype=np.uint8)
    stats = []
    for frame in range(scene.num_frames):
        sounding_owner = np.where(
            (owner[frame] >= 0) & scene.sounding[frame][np.maximum(owner[frame], 0)], owner[frame], -1
        )
        class_maps[frame] = class_of[sounding_owner.astype(np.int64) + 1]
        stats.append(scenes.instance_stats(owner[frame], count))
    sounding_classes = [
        sorted({obj.class_id for obj in scene.objects if scene.sounding[f, obj.instance] and stats[f][0][obj.instance]})
        for f in range(scene.num_frames)
    ]
    ids, audio, clips = _sound_and_ids(rng, plan, scene, identities, vid, start_s, vgg, width)
    annotated = [
        not (plan.task == "v1s" and plan.split == "train" and frame > 0) for frame in range(scene.num_frames)
    ]
    content = layouts.VideoContent(
        task=plan.task,
        split=plan.split,
        ids=ids,
        width=width,
        height=height,
        frames=frames,
        class_maps=class_maps,
        annotated=annotated,
        silent=list(scene.silent),
        sounding_classes=sounding_classes,
        class_names={identity.class_id: identity.name for identity in identities},
        audio=audio,
        clips=clips,
        multi_instance=multi_instance,
    )
    return scene, content, stats


def _sound_and_ids(
    rng: np.random.Generator,
    plan: VideoPlan,
    scene: scenes.Scene,
    identities: list[scenes.ClassIdentity],
    vid: str,
    start_s: int,
    vgg: list[str],
    width: int,
) -> tuple[dict[str, Any], np.ndarray | None, list[dict[str, Any]]]:
    """A video's ids in its layout's form and its sound: one wav for an AVSS video, one clip per
    sounding object for VPO. Draws from `rng` after the scene (the order keeps videos stable)."""
    ids: dict[str, Any] = {"vid": vid}
    audio = None
    clips: list[dict[str, Any]] = []
    if plan.task in AVSS_TASKS:
        s_min, s_sec = divmod(start_s, 60)
        ids.update(
            uid=f"{vid}_{start_s * 1000}_{(start_s + scene.num_frames) * 1000}",
            s_min=s_min,
            s_sec=s_sec,
            name=vid,
            s4_start=0,
            category_class=scene.objects[0].class_id,
        )
        audio = layouts.to_pcm16(scenes.scene_audio(rng, scene, identities, layouts.SAMPLE_RATE_HZ))
    else:
        img_id = (TASK_CODES[plan.task] - 3) * 1_000_000 + plan.index
        # DDESeg VPO uid `{type}/{id}`: with its `/`, pandas keeps it a string (a bare 12-digit
        # id becomes an int that the official loader cannot join into a path)
        ids.update(img_id=img_id, vpo_uid=f"{plan.task}/{img_id:012d}")
        samples = layouts.VGG_CLIP_S * layouts.SAMPLE_RATE_HZ
        for obj in scene.objects:
            if not scene.sounding[0, obj.instance]:
                continue
            params = scenes.sample_sound_params(rng)
            signal = scenes.class_sound(identities[obj.class_id - 1], params, samples, layouts.SAMPLE_RATE_HZ)
            signal += scenes.ambience(rng, samples, layouts.SAMPLE_RATE_HZ)
            clips.append(
                {
                    "instance": obj.instance,
                    "class_id": obj.class_id,
                    "ann_id": _ann_id(ids, obj.instance),
                    "vgg_file": vgg[len(clips)],
                    "audio_pos": round(obj.centre[0] / width, 4),
                    "pcm": layouts.to_pcm16(signal),
                }
            )
    return ids, audio, clips


def _write_parts(layout: str, root: Path, content: layouts.VideoContent, classes: int) -> dict[str, layouts.Written]:
    task = content.task
    if layout == "avsbench":
        # the release names classes by the real AVSS list (label2idx.json): id k is AVSS_CLASSES[k]
        content = replace(content, class_names={k: AVSS_CLASSES[k] for k in content.class_names})
        written = {"S4": layouts.write_s4(root, content)} if task == "v1s" else {}
        if task == "v1m":
            written["MS3"] = layouts.write_ms3(root, content)
        written["AVSS"] = layouts.write_avss(root, content, avss_palette(classes + 1))
        return written
    if layout == "ddeseg":
        if task in AVSS_TASKS:
            return {"AVSS": layouts.write_ddeseg_avss(root, content)}
        return {"VPO": layouts.write_ddeseg_vpo(root, content)}
    return {"VPO": layouts.write_vpo(root, content, _coco_ids(classes))}


def build_video(config: SynthConfig, plan: VideoPlan, root: str) -> dict[str, Any]:
    """Render one planned video, write its files under `root`; return its meta record, csv rows
    and bbox-json entries. Runs in worker processes (arguments and result are picklable)."""
    identities = scenes.class_identities(config.classes)
    scene, content, stats = _content(config, plan, identities)
    written = _write_parts(config.layout, Path(root), content, config.classes)
    frames = []
    for frame in range(scene.num_frames):
        areas, boxes = stats[frame]
        visible = [
            {
                "instance": obj.instance,
                "class_id": obj.class_id,
                "sounding": bool(scene.sounding[frame, obj.instance]),
                "area_px": areas[obj.instance],
                "box": boxes[obj.instance],
            }
            for obj in scene.objects
            if areas[obj.instance] > 0
        ]
        frames.append(
            {
                "frame": frame,
                "start_s": frame,
                "end_s": frame + 1,
                "silent": bool(scene.silent[frame]),
                "annotated": content.annotated[frame],
                "visible": visible,
                "sounding_classes": content.sounding_classes[frame],
                "offscreen": sorted(scene.offscreen[frame]),
                "files": {part: done.frame_files[frame] for part, done in written.items()},
            }
        )
    names = content.class_names
    ann_ids = {obj.instance: _ann_id(content.ids, obj.instance) for obj in scene.objects}
    ids = {key: value for key, value in content.ids.items() if key != "category_class"}
    meta = {
        "task": plan.task,
        "index": plan.index,
        "split": plan.split,
        "video": ids["uid"] if plan.task in AVSS_TASKS else ids["vpo_uid"].rsplit("/", 1)[-1],
        "ids": ids,
        "width": content.width,
        "height": content.height,
        "num_frames": scene.num_frames,
        "duration_s": scene.num_frames if plan.task in AVSS_TASKS else layouts.VGG_CLIP_S,
        "multi_instance": content.multi_instance,
        "objects": [
            {"instance": obj.instance, "class_id": obj.class_id, "name": names[obj.class_id],
             "ann_id": ann_ids.get(obj.instance)}
            for obj in scene.objects
        ],
        "offscreen_classes": scene.offscreen_classes,
        "files": {part: done.video_files for part, done in written.items()},
        "frames": frames,
    }
    rows: dict[str, list[list[Any]]] = {}
    boxes: dict[str, dict[str, list[float]]] = {}
    for done in written.values():
        for path, part_rows in done.rows.items():
            rows.setdefault(path, []).extend(part_rows)
        for path, entries in done.boxes.items():
            boxes.setdefault(path, {}).update(entries)
    return {"meta": meta, "rows": rows, "boxes": boxes}


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _json_bytes(value: Any, sort_keys: bool = True, indent: int | None = 1) -> bytes:
    return (json.dumps(value, sort_keys=sort_keys, indent=indent) + "\n").encode()


def _class_records(config: SynthConfig) -> list[dict[str, Any]]:
    coco_ids = _coco_ids(config.classes)
    records = []
    for identity in scenes.class_identities(config.classes):
        record = asdict(identity)
        record["id"] = record.pop("class_id")
        record["rgb"] = list(identity.rgb)
        record["band_hz"] = list(identity.band_hz)
        in_vpo = identity.class_id < len(VPO_CLASSES)
        record["vpo_name"] = VPO_CLASSES[identity.class_id] if in_vpo else None
        record["avss_name"] = AVSS_CLASSES[identity.class_id]  # its name in the avsbench layout
        record["coco_id"] = int(coco_ids[identity.class_id]) if in_vpo else None
        records.append(record)
    return records


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an `out_dir` that is a file, or a non-empty folder that is not a synthetic dataset
    (or is one, without `overwrite`)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DDESegError(f"--out {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise DDESegError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it")
            if not (out_dir / META_NAME).is_file():
                raise DDESegError(
                    f"--out {out_dir} is not a synthetic dataset (no {META_NAME}); refusing to delete it"
                )
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def generate(
    layout: str,
    out_dir: str | os.PathLike[str],
    *,
    videos: int = 40,
    classes: int = 8,
    seed: int = 0,
    image_size: int = 224,
    tasks: Sequence[str] | None = None,
    offscreen_rate: float = 0.2,
    silent_rate: float = 0.1,
    aspects: Sequence[float] = DEFAULT_ASPECTS,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic dataset in `layout` to `out_dir`; return `out_dir`.

    Args:
        layout: `avsbench`, `ddeseg` or `vpo`.
        out_dir: RAW_DIR; must not exist or be empty (or hold an earlier synthetic dataset and
            `overwrite`). Files are written to a temporary sibling renamed at the end.
        videos: total number of videos (VPO: images), spread evenly over `tasks`.
        classes: number of object classes (2..26; 2..21 with VPO tasks).
        seed: everything is a function of the arguments: same arguments, same bytes.
        image_size: frame height in pixels (v1s/v1m frames are square; v2 and VPO images are
            `image_size * aspect` wide, the aspect drawn per video from `aspects`).
        tasks: subset of the layout's tasks (default: all of them).
        offscreen_rate: chance that an off-screen class sounds in a second (v1m, v2).
        silent_rate: chance that a second is silent (v1s, v1m, v2).
        workers: processes (the output does not depend on it).
        progress: called as `progress(videos_done, videos_total)`.
    """
    config = SynthConfig(
        layout=layout,
        videos=videos,
        classes=classes,
        seed=seed,
        image_size=image_size,
        tasks=tuple(tasks or ()),
        offscreen_rate=offscreen_rate,
        silent_rate=silent_rate,
        aspects=tuple(float(a) for a in aspects),
    ).validate()
    if workers < 1:
        raise DDESegError(f"--workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    plans = plan_videos(config)
    with building_directory(out_dir, suffix=".synth-tmp") as temporary:
        results = _run(config, plans, temporary, workers, progress)
        _write_tables(config, temporary, plans, results)
    return out_dir


def _run(
    config: SynthConfig,
    plans: list[VideoPlan],
    root: Path,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    total = len(plans)
    results: list[dict[str, Any] | None] = [None] * total
    if progress:
        progress(0, total)
    if workers == 1:
        for position, plan in enumerate(plans):
            results[position] = build_video(config, plan, str(root))
            if progress:
                progress(position + 1, total)
    else:
        # spawn: the parent may run threads (rich's live display), which fork does not survive.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(build_video, config, plan, str(root)): i for i, plan in enumerate(plans)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress:
                    progress(done, total)
    return [result for result in results if result is not None]


def _write_tables(config: SynthConfig, root: Path, plans: list[VideoPlan], results: list[dict[str, Any]]) -> None:
    """csv files, label2idx / bbox jsons and synth_meta.json, from the per-video results."""
    rows: dict[str, list[list[Any]]] = {}
    boxes: dict[str, dict[str, list[float]]] = {}
    for result in results:
        for path, part_rows in result["rows"].items():
            rows.setdefault(path, []).extend(part_rows)
        for path, entries in result["boxes"].items():
            boxes.setdefault(path, {}).update(entries)
    for path, part_rows in rows.items():
        layouts.write_bytes(root, path, _csv_bytes(layouts.CSV_HEADERS[path], part_rows))
    for path, entries in boxes.items():
        layouts.write_bytes(root, path, _json_bytes(entries, indent=None))
    identities = scenes.class_identities(config.classes)
    made = {plan.task for plan in plans}
    parts = {}
    for part, info in PART_INFO[config.layout].items():
        if not made & set(info["tasks"]):
            continue
        parts[part] = {"root": layouts.PART_ROOTS[config.layout][part], **info}
        if "label2idx" in info:
            # avsbench: the release's own file, the 71 real AVSS classes (synthetic class k is
            # AVSS id k); ddeseg's download ships none: ours names the synthetic classes
            names = list(AVSS_CLASSES[1:]) if config.layout == "avsbench" else [i.name for i in identities]
            mapping = layouts.label2idx(names)
            layouts.write_bytes(root, info["label2idx"], _json_bytes(mapping, sort_keys=False, indent=4))
    meta = {
        "format": "ddeseg-synth-meta",
        "version": 1,
        "layout": config.layout,
        "params": {**asdict(config), "tasks": list(config.tasks), "aspects": list(config.aspects)},
        "sample_rate_hz": layouts.SAMPLE_RATE_HZ,
        "vpo_clip_s": layouts.VGG_CLIP_S,
        "vpo_window_s": layouts.VPO_WINDOW_S,
        "parts": parts,
        "splits": list(SPLITS),
        "classes": _class_records(config),
        "videos": [result["meta"] for result in results],
    }
    layouts.write_bytes(root, META_NAME, _json_bytes(meta))
