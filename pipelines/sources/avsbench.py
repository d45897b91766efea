"""Reader of the original AVSBench releases (`--layout avsbench`).

Two parts can live under one root (each found at depth <= 2 by its metadata file):

* AVSBench-semantic (AVSS): `metadata.csv` (columns `vid,uid,s_min,s_sec,a_obj,split,label`,
  `label` = subset v1s/v1m/v2) and `label2idx.json` beside it; per video
  `{label}/{uid}/frames/{i}.jpg`, `labels_rgb/{i}.png` (palette colours; `labels_semantic/{i}.png`
  class ids are used when the colour mask is absent) and one `audio.wav`. v1s/v1m have 5 frames,
  v2 has 10; v1s train annotates only frame 0.
* AVSBench-object: `Single-source/s4_meta_data.csv` (S4, task v1s; name, start, category, split by
  position) and `Multi-sources/ms3_meta_data.csv` (MS3, task v1m; name, split), with 224 px PNG
  frames `{name}_{1..5}.png`, binary 0/255 masks (S4 train: only `_1`) and one 5 s wav per video.

Part choice per task (`options["part"]`): `auto` (default) reads AVSS for a subset the AVSS csv
lists and AVSBench-object otherwise (the same videos are in both, so both at once would be
duplicates); `semantic` / `object` force one part.
Frame `i` (0-based; the object part's files count from 1) gets seconds `[i, i + 1)` of the video's
wav.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ddeseg.classes import AVSS_TASKS, S4_TO_AVSS, SOUNDING_OBJECT, SPLITS
from ddeseg.errors import DataError
from ddeseg.pipelines.records import AudioSpec, ClassList, FrameRef, MaskSpec, Reject
from ddeseg.pipelines.sources.common import Source, find_file, join, read_csv, read_csv_dicts, relative

FRAMES_PER_SUBSET = {"v1s": 5, "v1m": 5, "v2": 10}
OBJECT_FRAMES = 5
PARTS = ("auto", "semantic", "object")


def read_label2idx(path: Path) -> list[str]:
    """Class names by id from an AVSS `label2idx.json` (ids are the ranks of its values)."""
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable label2idx json ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise DataError(f"{path}: expected a mapping of class name -> integer index")
    if len(set(mapping.values())) != len(mapping):
        raise DataError(f"{path}: two classes share an index")
    names = sorted(mapping, key=mapping.get)
    if not names or names[0] != "background":
        raise DataError(f"{path}: the smallest index must be 'background', got {names[:1]}")
    return names


class AVSBenchSource(Source):
    layout = "avsbench"
    tasks_supported = AVSS_TASKS

    def discover(self) -> dict[str, Any]:
        part = self.options.get("part", "auto")
        if part not in PARTS:
            raise DataError(f"avsbench part must be one of {PARTS}, got {part!r}")
        self.avss_csv = find_file(self.root, "metadata.csv")
        self.s4_csv = find_file(self.root, "s4_meta_data.csv")
        self.ms3_csv = find_file(self.root, "ms3_meta_data.csv")
        avss_subsets: set[str] = set()
        if self.avss_csv is not None and part != "object":
            label2idx = self.avss_csv.parent / "label2idx.json"
            if not label2idx.is_file():
                raise DataError(f"{self.avss_csv}: AVSS metadata without {label2idx.name} beside it")
            self.set_avss_classes(ClassList(read_label2idx(label2idx)))
            self.avss_rows = read_csv_dicts(self.avss_csv, ("uid", "split", "label"))
            avss_subsets = {row["label"] for _, row in self.avss_rows}
        object_part = {"v1s": self.s4_csv, "v1m": self.ms3_csv} if part != "semantic" else {}
        self.part_of: dict[str, str] = {}
        for task in AVSS_TASKS:
            if task in avss_subsets:
                self.part_of[task] = "semantic"
            elif object_part.get(task) is not None:
                self.part_of[task] = "object"
        return self.part_of

    def expected_files(self) -> str:
        return (
            "expected metadata.csv + label2idx.json (AVSBench-semantic), "
            "Single-source/s4_meta_data.csv or Multi-sources/ms3_meta_data.csv (AVSBench-object)"
        )

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["parts"] = {task: self.part_of[task] for task in self.tasks}
        return described

    def scan(self) -> Iterator[FrameRef | Reject]:
        semantic = [task for task in self.tasks if self.part_of[task] == "semantic"]
        if semantic:
            yield from self._scan_semantic(semantic)
        if "v1s" in self.tasks and self.part_of["v1s"] == "object":
            yield from self._scan_s4()
        if "v1m" in self.tasks and self.part_of["v1m"] == "object":
            yield from self._scan_ms3()
        self.classes.finalize()

    def _scan_semantic(self, subsets: list[str]) -> Iterator[FrameRef | Reject]:
        assert self.avss_csv is not None
        base = relative(self.root, self.avss_csv.parent)
        csv_name = relative(self.root, self.avss_csv)
        yield from self.bad_rows(self.avss_csv, self.avss_rows)
        seen: dict[tuple[str, str], int] = {}
        for line, row in self.avss_rows:
            uid, split, subset = row["uid"], row["split"], row["label"]
            where = f"{csv_name}:{line}"
            if subset not in AVSS_TASKS:
                yield Reject(where, f"unknown subset {subset!r} in column label (v1s, v1m or v2)")
                continue
            if subset not in subsets:
                continue
            if split not in SPLITS:
                yield Reject(where, f"unknown split {split!r} for video {uid!r}")
                continue
            if (subset, uid) in seen:
                yield Reject(
                    where, f"duplicate row: video {uid!r} already listed at line {seen[subset, uid]}"
                )
                continue
            seen[subset, uid] = line
            video_dir = join(base, subset, uid)
            for frame in range(FRAMES_PER_SUBSET[subset]):
                mask = MaskSpec(
                    candidates=(
                        (f"{video_dir}/labels_rgb/{frame}.png", "palette"),
                        (f"{video_dir}/labels_semantic/{frame}.png", "index"),
                    ),
                    optional=subset == "v1s" and split == "train" and frame > 0,
                )
                yield FrameRef(
                    task=subset,
                    subset=subset,
                    split=split,
                    video=uid,
                    frame=frame,
                    image=f"{video_dir}/frames/{frame}.jpg",
                    mask=mask,
                    audio=AudioSpec(paths=(f"{video_dir}/audio.wav",), window="second", start_s=float(frame)),
                )

    def _s4_class(self, category: str) -> str:
        if category in self.classes.names:
            return category
        alias = S4_TO_AVSS.get(category)
        if alias is not None and alias in self.classes.names:
            return alias
        self.classes.add_extra(category)
        return category

    def _object_rows(self, csv_path: Path, columns: int) -> Iterator[tuple[str, list[str]] | Reject]:
        csv_name = relative(self.root, csv_path)
        seen: dict[str, int] = {}
        rows = read_csv(csv_path)
        yield from self.bad_rows(csv_path, rows)
        for line, row in rows:
            where = f"{csv_name}:{line}"
            if len(row) < columns:
                yield Reject(where, f"expected {columns} columns, got {len(row)}")
                continue
            name, split = row[0], row[columns - 1]
            if split not in SPLITS:
                yield Reject(where, f"unknown split {split!r} for video {name!r}")
                continue
            if name in seen:
                yield Reject(where, f"duplicate row: video {name!r} already listed at line {seen[name]}")
                continue
            seen[name] = line
            yield where, row

    def _object_video(
        self,
        task: str,
        split: str,
        name: str,
        frame_files: Callable[[int], tuple[str, str]],
        audio: str,
        foreground: str,
        masks_from_frame: int,
    ) -> Iterator[FrameRef]:
        """The 5 frames of an AVSBench-object video; `frame_files(number)` gives the image and
        mask of file number 1..5. Frames numbered above `masks_from_frame` may lack a mask."""
        for number in range(1, OBJECT_FRAMES + 1):
            image, mask = frame_files(number)
            yield FrameRef(
                task=task,
                subset="s4" if task == "v1s" else "ms3",
                split=split,
                video=name,
                frame=number - 1,
                image=image,
                mask=MaskSpec(
                    candidates=((mask, "binary"),),
                    optional=number > masks_from_frame,
                    foreground=foreground,
                ),
                audio=AudioSpec(paths=(audio,), window="second", start_s=float(number - 1)),
            )

    def _scan_s4(self) -> Iterator[FrameRef | Reject]:
        assert self.s4_csv is not None
        data = relative(self.root, self.s4_csv.parent / "s4_data")
        for item in self._object_rows(self.s4_csv, 4):
            if isinstance(item, Reject):
                yield item
                continue
            name, _start, category, split = item[1][:4]
            folder = f"{split}/{category}/{name}"

            def s4_files(number: int, folder: str = folder, name: str = name) -> tuple[str, str]:
                return (
                    f"{data}/visual_frames/{folder}/{name}_{number}.png",
                    f"{data}/gt_masks/{folder}/{name}_{number}.png",
                )

            audio = f"{data}/audio_wav/{split}/{category}/{name}.wav"
            masks_from = 1 if split == "train" else OBJECT_FRAMES  # S4 train annotates frame 1 only
            yield from self._object_video(
                "v1s", split, name, s4_files, audio, self._s4_class(category), masks_from
            )

    def _scan_ms3(self) -> Iterator[FrameRef | Reject]:
        assert self.ms3_csv is not None
        data = relative(self.root, self.ms3_csv.parent / "ms3_data")
        self.classes.add_extra(SOUNDING_OBJECT)
        for item in self._object_rows(self.ms3_csv, 2):
            if isinstance(item, Reject):
                yield item
                continue
            name, split = item[1][0], item[1][1]

            def ms3_files(number: int, name: str = name, split: str = split) -> tuple[str, str]:
                return (
                    f"{data}/visual_frames/{name}/{name}.mp4_{number}.png",
                    f"{data}/gt_masks/{split}/{name}/{name}_{number}.png",
                )

            audio = f"{data}/audio_wav/{split}/{name}.wav"
            yield from self._object_video(
                "v1m", split, name, ms3_files, audio, SOUNDING_OBJECT, OBJECT_FRAMES
            )
