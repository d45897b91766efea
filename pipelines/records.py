"""The unified per-frame record that every raw-layout reader produces, and the unified class list.

A reader works in two steps so that the heavy part can run in worker processes and the output
does not depend on their number:

1. `scan()` enumerates cheap, picklable `FrameRef`s (ids and relative paths, no file contents);
2. `load(ref)` reads one frame into a `FrameRecord` (original image bytes, class-id mask, audio),
   or raises `RecordError(path, reason)`, which `prepare` turns into a line of `rejects.jsonl`.

The unified class list (`ClassList`, written as `classes.json`)
----------------------------------------------------------------
One list for every task of a prepared directory, so that a mask means the same thing everywhere.
Its ids are stable across datasets and runs:

* ids `0..70`: AVSBench-semantic (AVSS) as the official `label2idx.json` orders it (background
  first, then the 70 classes alphabetically; the official colour palette index of a class is
  its id). When the raw `avsbench` root has its own `label2idx.json`, that file's names and
  order are used instead of the built-in copy (the ids are still the palette indices).
* then the VPO classes whose names are not already AVSS names (`cell phone`, `cow`, `female`,
  `male`, `mouse`, `skateboard`, `sports ball`, `tennis racket`, `zebra`); VPO classes that AVSS
  has (dog, car, ...) share the AVSS id. VPO masks (COCO category ids) are remapped to these ids.
* then, only when a run meets them, extra classes in a fixed order: AVSBench-object S4
  categories that have no clear AVSS name (they keep their S4 name), and `sounding-object`, the
  foreground of masks that are binary and carry no category (original MS3).

Binary-only masks: an original S4 mask (0/255) becomes its video's csv category mapped by
`S4_TO_AVSS` (e.g. `dog_barking` -> `dog`); an original MS3 mask (0/255, no category) becomes
`sounding-object`. Pixel value 255 in the unified masks is `IGNORE_INDEX` (VPO's ignore label);
it is never a class and never sounding.

`classes.json` also records, per task, how the official protocols read the shards:
`v1s`/`v1m` are binary (any class > 0 is foreground, 1 output channel), `v2` is the 71-class
AVSS protocol over the `v1s`, `v1m` and `v2` directories together (DDESeg's `task == "v2"`
reads every AVSS subset), and `VPO-*` use the 22 VPO classes in VPO order (`ids` maps a
task-local class index to its unified id; `ddeseg.data.schema.task_label_lut` inverts it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddeseg.classes import AVSS_CLASSES, AVSS_TASKS, VPO_CLASSES
from ddeseg.data.schema import IGNORE_INDEX, sample_key


class ClassList:
    """The unified class list: names by id, with the AVSS and VPO families placed first."""

    def __init__(self, avss_names: tuple[str, ...] | list[str] = AVSS_CLASSES):
        if not avss_names or avss_names[0] != "background":
            raise ValueError("the AVSS class list must start with 'background'")
        self.avss_count = len(avss_names)
        self.names: list[str] = list(avss_names)
        for name in VPO_CLASSES[1:]:
            if name not in self.names:
                self.names.append(name)
        self.base_count = len(self.names)
        self._extras: set[str] = set()

    def id_of(self, name: str) -> int:
        return self.names.index(name)

    def add_extra(self, name: str) -> int:
        """Id of `name`, appending it as an extra class when the list does not have it yet.

        Call `finalize()` once all extras are known: extras are then sorted by name so that
        their ids do not depend on the order in which a reader met them.
        """
        if name not in self.names:
            self.names.append(name)
            self._extras.add(name)
        return self.names.index(name)

    def finalize(self) -> None:
        extras = sorted(self._extras)
        self.names = self.names[: self.base_count] + extras
        if len(self.names) > IGNORE_INDEX:
            raise ValueError(f"{len(self.names)} classes do not fit an 8-bit mask (255 is ignore)")

    @property
    def vpo_ids(self) -> list[int]:
        return [self.id_of(name) for name in VPO_CLASSES]

    def task_protocols(self, tasks: list[str]) -> dict[str, Any]:
        protocols: dict[str, Any] = {}
        for task in tasks:
            if task in ("v1s", "v1m"):
                protocols[task] = {"binary": True, "num_classes": 1, "reads": [task], "ids": None}
            elif task == "v2":
                protocols[task] = {
                    "binary": False,
                    "num_classes": self.avss_count,
                    "reads": list(AVSS_TASKS),
                    "ids": list(range(self.avss_count)),
                }
            else:
                protocols[task] = {
                    "binary": False,
                    "num_classes": len(VPO_CLASSES),
                    "reads": [task],
                    "ids": self.vpo_ids,
                }
        return protocols

    def to_json(self, tasks: list[str]) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "background": 0,
            "ignore_index": IGNORE_INDEX,
            "avss_classes": self.avss_count,
            "tasks": self.task_protocols(tasks),
        }


# --------------------------------------------------------------------------------------------
# References and records
# --------------------------------------------------------------------------------------------

MASK_KINDS = ("binary", "palette", "index", "vpo", "coco")


@dataclass(frozen=True)
class MaskSpec:
    """Where a frame's mask is and how its pixels become unified class ids.

    `candidates` are tried in order (relative path, kind); the first that exists is read.
    kind: `binary` (0/255 or 0/1; foreground -> class `foreground`), `palette` (AVSS RGB colours),
    `index` (AVSS class ids), `vpo` (VPO class ids 0..21), `coco` (COCO category ids of the
    original VPO, 255 ignore).
    `optional`: when no candidate exists the frame is kept unannotated instead of rejected.
    """

    candidates: tuple[tuple[str, str], ...]
    optional: bool = False
    foreground: str = ""  # class name of a binary mask's foreground (resolved at load time)


@dataclass(frozen=True)
class AudioSpec:
    """Which audio a frame gets.

    `paths`: wav files relative to the root (several: mixed, VPO multi-source).
    `window`: `second` (seconds `[start_s, start_s + 1)` of the file), `head` (the file from its
    start, as the official DDESeg loader reads a per-frame wav) or `centre` (CAVP's crop of
    `crop_s` seconds centred on the file). The window is then resampled and repeat-padded or cut
    to the clip length from its start (the official `_wav_repeat`).
    `pan`: per path, the CAVP stereo position (left gain 1 - p, right gain p), mixed down to mono.
    """

    paths: tuple[str, ...]
    window: str = "head"
    start_s: float = 0.0
    crop_s: float = 3.0
    pan: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FrameRef:
    task: str
    subset: str
    split: str
    video: str
    frame: int
    image: str  # relative to the root
    mask: MaskSpec | None  # None: this frame has no annotation at all
    audio: AudioSpec
    silent_hint: bool | None = None  # from the raw metadata when it says so

    @property
    def key(self) -> str:
        return sample_key(self.task, self.video, self.frame)

    @property
    def sort_key(self) -> tuple[str, str, str, int]:
        return (self.task, self.split, self.video, self.frame)

    def paths(self) -> list[str]:
        listed = [self.image, *self.audio.paths]
        if self.mask is not None:
            listed += [path for path, _ in self.mask.candidates]
        return listed


@dataclass
class FrameRecord:
    """One loaded frame: what a shard sample is made of (before log-mel and boxes)."""

    ref: FrameRef
    image_bytes: bytes  # the file's bytes, never re-encoded
    image_ext: str  # jpg | png, from the content
    height: int
    width: int
    mask: np.ndarray | None  # uint8 [H, W] unified class ids; None when not annotated
    audio: np.ndarray  # float32 [clip samples], mono, at the configured rate
    source: dict[str, str] = field(default_factory=dict)  # what was read, relative to the root

    @property
    def annotated(self) -> bool:
        return self.mask is not None


@dataclass(frozen=True)
class Reject:
    """A frame (or a metadata row) that could not be used: one line of `rejects.jsonl`."""

    path: str
    reason: str
    key: str | None = None

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "path": self.path, "reason": self.reason}, sort_keys=True)


class RecordError(Exception):
    """Raised by a reader for one bad frame; `prepare` records it and goes on (or stops)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
