"""Reader of DDESeg's reorganised download (`--layout ddeseg`): an AVSS part and a VPO part,
each found at depth <= 2 under the root by its metadata file.

AVSS part (tasks v1s, v1m, v2), the folder of `metadata_w_silent.csv`:
- csv with a header, read by position as the official loader: 1 uid `{video}_{i}`, 4 split,
  5 subset; one row per second, silent seconds included. A header column named `silent` or
  `is_silent` (0/1, true/false), when present, gives the silent flag; otherwise a frame is
  silent when its mask is empty.
- `{subset}/{video}/frames/{i}.jpg`, `labels_semantic/{i}.png` (class ids 0..70, stored in full
  for every subset: the binary v1s/v1m protocols binarise in the loader), `audios/{i}.wav`
  (one wav per second; its start, repeat-padded or cut to the clip length, like the official
  `_wav_repeat`). A v1s train frame other than 0 without a mask is kept unannotated (AVSS
  annotates only the first one); any other missing mask is a reject.
- `avss_bbox_orisize.json` is not read: prepare computes the boxes from the masks.

VPO part (tasks VPO-SS, VPO-MS, VPO-MSMI), the folder of `vpo_data_clean.csv`:
- csv (pandas-style header): positions 0 uid, 1 frame file, 2 mask file; named columns `split`
  and `type` (the task). The real file has 6 columns (uid, frame, mask, a category list such as
  `[3, 7]`, split, type); the category list is not needed (the mask has the classes).
- A uid names the video folder `{VPO}/{type}/{id}` in one of three forms (`uid_forms` in
  `prepare.json` counts them): `{id}`, `{type}/{id}`, or an absolute path of the authors'
  machine ending in `{type}/{id}` (the released config and bbox keys use such paths), which is
  resolved by its trailing components under the VPO folder, never outside it. `{id}` also finds
  a folder `{VPO}/{id}` directly (the form of ddeseg's older synthetic sets).
- `{folder}/frames/{frame}`, `{folder}/labels_semantic/{mask}` (VPO class ids 0..21, remapped to
  the unified list), `{folder}/mono_audio.wav` or `stereo_audio.wav` (`data.vpo_audio`; stereo is
  averaged to mono), from its start like the official loader.
- A video with several rows gets frame indices 0, 1, ... in the order of its frame file names.

Every csv is read row by row: an undecodable row is one reject (`file.csv:LINE`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ddeseg.classes import AVSS_TASKS, SPLITS, VPO_TASKS
from ddeseg.errors import DataError
from ddeseg.pipelines.records import AudioSpec, ClassList, FrameRef, MaskSpec, RecordError, Reject
from ddeseg.pipelines.sources.avsbench import read_label2idx
from ddeseg.pipelines.sources.common import (
    CsvRows,
    Source,
    find_file,
    join,
    read_csv_header,
    relative,
    safe_path,
)

AVSS_CSV = "metadata_w_silent.csv"
VPO_CSV = "vpo_data_clean.csv"
SILENT_COLUMNS = ("silent", "is_silent")
TRUE_WORDS = {"1", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "f", ""}
UID_FORMS = ("{id}", "{type}/{id}", "absolute")
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")


def uid_candidates(uid: str, task: str) -> tuple[str, list[str]]:
    """(form, folders relative to the VPO folder to try, in order) of a VPO csv uid.

    `{id}` -> `{type}/{id}`, then `{id}`; `{type}/{id}` (any relative path) -> itself; an
    absolute path (posix or `C:\\...`) -> its last two components, then `{type}/{last}`, then
    `{last}`: the authors' machine prefix is dropped, the tail must exist under the root."""
    if uid.startswith("/") or _WINDOWS_ABSOLUTE.match(uid):
        parts = [part for part in PurePosixPath(uid.replace("\\", "/")).parts if part not in ("/", "")]
        if _WINDOWS_ABSOLUTE.match(uid):
            parts = parts[1:]  # the drive
        tails = ["/".join(parts[-2:]), f"{task}/{parts[-1]}", parts[-1]] if parts else []
        return "absolute", list(dict.fromkeys(tails))
    if "/" in uid:
        return "{type}/{id}", [uid]
    return "{id}", [f"{task}/{uid}", uid]


class DDESegLayoutSource(Source):
    layout = "ddeseg"
    tasks_supported = AVSS_TASKS + VPO_TASKS

    def discover(self) -> dict[str, Any]:
        self.avss_csv = find_file(self.root, AVSS_CSV)
        self.vpo_csv = find_file(self.root, VPO_CSV)
        found: dict[str, Path] = {}
        self.avss_rows = CsvRows()
        self.avss_header: list[str] = []
        if self.avss_csv is not None:
            label2idx = self.avss_csv.parent / "label2idx.json"
            if label2idx.is_file():
                self.set_avss_classes(ClassList(read_label2idx(label2idx)))
            header, self.avss_rows = read_csv_header(self.avss_csv)
            self.avss_header = [cell.lower() for cell in header]
            for _, row in self.avss_rows:
                if len(row) > 5 and row[5] in AVSS_TASKS:
                    found[row[5]] = self.avss_csv
        self.vpo_rows: list[tuple[int, list[str], dict[str, str]]] = []
        self.vpo_bad: list[tuple[int, str]] = []
        self.uid_forms: Counter[str] = Counter()
        if self.vpo_csv is not None:
            header, rows = read_csv_header(self.vpo_csv)
            self.vpo_bad = rows.bad
            missing = [name for name in ("split", "type") if name not in header]
            if missing:
                raise DataError(f"{self.vpo_csv}: missing column(s) {missing}; found {header}")
            for line, cells in rows:
                named = dict(zip(header, cells, strict=False))
                self.vpo_rows.append((line, cells, named))
                if named.get("type") in VPO_TASKS:
                    found[named["type"]] = self.vpo_csv
        return found

    def expected_files(self) -> str:
        return f"expected {AVSS_CSV} (AVSS part) or {VPO_CSV} (VPO part)"

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if any(task in VPO_TASKS for task in self.tasks):
            described["uid_forms"] = {form: self.uid_forms[form] for form in UID_FORMS}
        return described

    def scan(self) -> Iterator[FrameRef | Reject]:
        if any(task in AVSS_TASKS for task in self.tasks):
            yield from self._scan_avss()
        if any(task in VPO_TASKS for task in self.tasks):
            yield from self._scan_vpo()
        self.classes.finalize()

    def _silent_column(self) -> int | None:
        for name in SILENT_COLUMNS:
            if name in self.avss_header:
                return self.avss_header.index(name)
        return None

    def _scan_avss(self) -> Iterator[FrameRef | Reject]:
        assert self.avss_csv is not None
        base = relative(self.root, self.avss_csv.parent)
        csv_name = relative(self.root, self.avss_csv)
        silent_column = self._silent_column()
        yield from self.bad_rows(self.avss_csv, self.avss_rows)
        seen: dict[tuple[str, str], int] = {}
        for line, row in self.avss_rows:
            where = f"{csv_name}:{line}"
            if len(row) < 6:
                yield Reject(
                    where, f"expected at least 6 columns (uid at 1, split at 4, subset at 5), got {len(row)}"
                )
                continue
            uid, split, subset = row[1], row[4], row[5]
            if subset not in AVSS_TASKS:
                yield Reject(where, f"unknown subset {subset!r} in column 5 (v1s, v1m or v2)")
                continue
            if subset not in self.tasks:
                continue
            video, _, index = uid.rpartition("_")
            if not video or not index.isdigit():
                yield Reject(where, f"uid {uid!r} is not of the form VIDEO_FRAME")
                continue
            if split not in SPLITS:
                yield Reject(where, f"unknown split {split!r} for uid {uid!r}")
                continue
            if (subset, uid) in seen:
                yield Reject(where, f"duplicate row: uid {uid!r} already listed at line {seen[subset, uid]}")
                continue
            seen[subset, uid] = line
            silent_hint = None
            if silent_column is not None and silent_column < len(row):
                word = row[silent_column].lower()
                if word not in TRUE_WORDS | FALSE_WORDS:
                    yield Reject(where, f"silent flag {row[silent_column]!r} is not 0/1 or true/false")
                    continue
                silent_hint = word in TRUE_WORDS
            frame = int(index)
            video_dir = join(base, subset, video)
            yield FrameRef(
                task=subset,
                subset=subset,
                split=split,
                video=video,
                frame=frame,
                image=f"{video_dir}/frames/{index}.jpg",
                mask=MaskSpec(
                    candidates=((f"{video_dir}/labels_semantic/{index}.png", "index"),),
                    optional=subset == "v1s" and split == "train" and frame > 0,
                ),
                audio=AudioSpec(paths=(f"{video_dir}/audios/{index}.wav",), window="head"),
                silent_hint=silent_hint,
            )

    def _video_folder(self, base: str, uid: str, task: str) -> tuple[str, str]:
        """(folder relative to the root, uid form) of a VPO uid; RecordError when no candidate
        folder exists or a candidate leaves the root."""
        form, candidates = uid_candidates(uid, task)
        if any(part in ("..", ".") for part in uid.replace("\\", "/").split("/")):
            raise RecordError(uid, f"uid {uid!r} has a '..' or '.' component (paths never leave the dataset root)")
        for candidate in candidates:
            folder = join(base, candidate)
            if safe_path(self.root, folder).is_dir():  # RecordError when it escapes the root
                return folder, form
        tried = ", ".join(join(base, candidate) for candidate in candidates) or "(none)"
        raise RecordError(uid, f"no video folder for uid {uid!r} ({form} form; tried {tried})")

    def _scan_vpo(self) -> Iterator[FrameRef | Reject]:
        assert self.vpo_csv is not None
        base = relative(self.root, self.vpo_csv.parent)
        csv_name = relative(self.root, self.vpo_csv)
        audio_file = "stereo_audio.wav" if self.vpo_audio == "stereo" else "mono_audio.wav"
        yield from self.bad_rows(self.vpo_csv, CsvRows(bad=self.vpo_bad))
        groups: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
        seen: dict[tuple[str, str, str], int] = {}
        folders: dict[tuple[str, str], tuple[str, str] | str] = {}  # (task, uid) -> (folder, form) | reason
        for line, cells, named in self.vpo_rows:
            where = f"{csv_name}:{line}"
            task, split = named.get("type", ""), named.get("split", "")
            if task not in VPO_TASKS:
                yield Reject(where, f"unknown type {task!r} (VPO-SS, VPO-MS or VPO-MSMI)")
                continue
            if task not in self.tasks:
                continue
            if len(cells) < 3 or not all(cells[:3]):
                yield Reject(where, "expected uid, frame and mask in the first three columns")
                continue
            if split not in SPLITS:
                yield Reject(where, f"unknown split {split!r}")
                continue
            uid, frame_file, mask_file = cells[0], cells[1], cells[2]
            if (task, uid) not in folders:
                try:
                    folders[task, uid] = self._video_folder(base, uid, task)
                except RecordError as error:
                    folders[task, uid] = error.reason
            resolved = folders[task, uid]
            if isinstance(resolved, str):
                yield Reject(where, resolved)
                continue
            folder, _ = resolved
            if (task, folder, frame_file) in seen:
                yield Reject(
                    where,
                    f"duplicate row: {uid}/{frame_file} already listed at line {seen[task, folder, frame_file]}",
                )
                continue
            seen[task, folder, frame_file] = line
            groups.setdefault((task, folder), []).append((frame_file, mask_file, split, where))
        for resolved in folders.values():
            if not isinstance(resolved, str):
                self.uid_forms[resolved[1]] += 1
        for (task, folder), rows in groups.items():
            video = folder.rsplit("/", 1)[-1]  # the id, whatever the uid's form
            for frame, (frame_file, mask_file, split, _) in enumerate(sorted(rows)):
                yield FrameRef(
                    task=task,
                    subset=task,
                    split=split,
                    video=video,
                    frame=frame,
                    image=join(folder, "frames", frame_file),
                    mask=MaskSpec(candidates=((join(folder, "labels_semantic", mask_file), "vpo"),)),
                    audio=AudioSpec(paths=(join(folder, audio_file),), window="head"),
                )
