"""The shard sample: one annotated (or explicitly unannotated) video frame and its second of audio.

Defined once here, used by the writer (`ddeseg.pipelines.shard_writer`) and every reader
(`ddeseg.data.stream`, evaluation, memory bank, `ddeseg inspect`).

A sample in a WebDataset tar is a group of files sharing a key (`__key__`):

| member          | content                                                                  |
|-----------------|--------------------------------------------------------------------------|
| `image.jpg` / `image.png` | the original frame bytes as the raw dataset stores them (no re-encode) |
| `mask.png`      | 8-bit single-channel ('L') PNG of class ids in `classes.json`, 0 = background; absent when the frame is not annotated |
| `audio.npy`     | float32 `[samples]` (mono) : this frame's second of audio at `model.frontend.sample_rate`, fixed length (repeat-padded like the official loader) |
| `logmel.npy`    | float16 `[frames, mel_bins]`: the model front end's log-mel of `audio.npy` (before `bn0`) |
| `meta.json`     | `SampleMeta` below |

Keys are `{task}-{video}-{frame:03d}` with `.` in ids replaced by `__` and every other character
outside `[A-Za-z0-9_-]` by `_` (WebDataset splits a member name at the first dot of its base
name, so a key must not contain one); the original ids stay in `meta.json`.

Decoding is done by our own functions below (never WebDataset's `pil`/`l8` decoders, which
corrupt index PNGs, and never its pickle decoders).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "png")
MASK = "mask.png"
AUDIO = "audio.npy"
LOGMEL = "logmel.npy"
META = "meta.json"

# Files of a prepared directory (`ddeseg prepare --out SHARDS_DIR`), see ../shared/CLI.md.
MANIFEST_FILE = "manifest.parquet"
CLASSES_FILE = "classes.json"
PREPARE_FILE = "prepare.json"
REJECTS_FILE = "rejects.jsonl"
SHARD_NAME = "shard-{index:06d}.tar"  # under SHARDS_DIR/{task}/{split}/

# Mask pixel value that is neither background nor a class (VPO's COCO "ignore" label): losses
# and metrics skip it, boxes never include it.
IGNORE_INDEX = 255

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(task: str, video: str, frame: int) -> str:
    """Shard key of one frame: stable, dot-free, unique per (task, video, frame)."""

    def clean(text: str) -> str:
        return _UNSAFE.sub("_", text.replace(".", "__"))

    return f"{clean(task)}-{clean(video)}-{frame:03d}"


@dataclass
class SampleMeta:
    """`meta.json` of a sample. Boxes are normalised `[x0, y0, x1, y1]` in [0, 1]: first and last
    (inclusive) sounding column / row divided by width / height, the official DDESeg bbox-json
    convention (`ddeseg.data.boxes`)."""

    key: str
    task: str  # v1s | v1m | v2 | VPO-SS | VPO-MS | VPO-MSMI
    subset: str  # the raw dataset's subset name
    split: str  # train | val | test
    video: str
    frame: int  # 0-based frame index within the video
    height: int
    width: int
    annotated: bool  # False: no ground-truth mask for this frame (AVSBench S4 train frames 2..5)
    silent: bool  # True: nothing sounds in this second (empty mask when annotated)
    classes: list[int] = field(default_factory=list)  # class ids present in the mask (no background)
    union_box: list[float] | None = None  # box of all sounding pixels; None for an empty mask
    class_boxes: dict[str, list[float]] = field(default_factory=dict)  # class id (str) -> box
    image_ext: str = "jpg"
    source: dict[str, str] = field(default_factory=dict)  # raw paths, relative to the root

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> SampleMeta:
        return cls(**json.loads(data))


# --------------------------------------------------------------------------------------------
# Encoding (writer side)
# --------------------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> bytes:
    """uint8 `[H, W]` class ids -> 'L' PNG bytes (deterministic)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 [H, W], got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Decoding (reader side)
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 RGB `[H, W, 3]`."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """'L' PNG bytes -> uint8 `[H, W]` class ids (no palette or brightness conversion)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "L":
            raise ValueError(f"mask PNG has mode {image.mode!r}, expected 'L' (class ids)")
        return np.asarray(image).copy()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def image_member(sample: dict[str, Any]) -> str:
    for ext in IMAGE_EXTENSIONS:
        if f"image.{ext}" in sample:
            return f"image.{ext}"
    raise KeyError(f"sample {sample.get('__key__')!r} has no image member")
