"""Reader of the original VPO release as CAVP reads it (`--layout vpo`).

The root holds `VPO/` and `vggsound_bench/` (CAVP's `root_dataset_dir`); a root that is itself
the `VPO` folder works when `vggsound_bench/` is inside it too (paths never leave the root).

- One csv per subset: `VPO/VPO-{SS,MS,MSMI}/vpo_{ss,ms,msmi}_data_stereo.csv`, one row per
  sounding source, columns `cateName, img_Id, ann_Ids, cateId, vgg_file, split, audio_pos`
  (+ `multi_instance` for MSMI). The split is kept as written (CAVP later merges val into test).
- VPO-SS: one sample per row, video `{img_Id:012d}_{ann_Ids:012d}`: image
  `data/{cateName}/{img_Id:012d}.jpg`, mask `mask/{cateName}/{img_Id:012d}_{ann_Ids:012d}.png`.
- VPO-MS / VPO-MSMI: one sample per image (its rows grouped), video `{img_Id:012d}`: image
  `data/{img_Id:012d}.jpg`, mask `mask/{img_Id:012d}.png`. MSMI rows with `multi_instance == 0`
  point to the VPO-MS folder (as CAVP's path substitution), falling back to VPO-MSMI when only
  that file exists.
- Masks hold COCO category ids (0 background, 255 ignore), remapped to the unified list through
  the VPO classes (CAVP `coco_class_dict`, plus any `cateId -> cateName` pair of the csv that the
  table lacks; a csv pair that contradicts the table is an error).
- Audio: `vggsound_bench/VGGSound/audios/{vgg_file}.wav`, mono. Default window: CAVP's crop, 3 s
  (`CAVP_CROP_S`) centred on the clip, of which the model gets the first `data.clip_seconds`
  (repeat-padded when short) -- exactly what DDESeg's loader takes from its reorganised VPO
  `mono_audio.wav` (the 3 s CAVP mix), so both layouts give the same audio. Several rows: the
  sources are summed (`data.vpo_audio: mono`) or panned by `audio_pos` as CAVP's stereo loader
  and mixed down to mono (`stereo`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddeseg.classes import COCO_TO_VPO, SPLITS, VPO_TASKS
from ddeseg.data.schema import IGNORE_INDEX
from ddeseg.errors import DataError
from ddeseg.pipelines.records import AudioSpec, FrameRef, MaskSpec, Reject
from ddeseg.pipelines.sources.common import CsvRows, Source, join, read_csv_dicts, relative, safe_path

CSV_NAMES = {
    "VPO-SS": "vpo_ss_data_stereo.csv",
    "VPO-MS": "vpo_ms_data_stereo.csv",
    "VPO-MSMI": "vpo_msmi_data_stereo.csv",
}
COLUMNS = ("cateName", "img_Id", "ann_Ids", "cateId", "vgg_file", "split", "audio_pos")
AUDIO_DIR = "vggsound_bench/VGGSound/audios"
CAVP_CROP_S = 3.0  # CAVP config_vpo_*.py: audio_len


class VPOSource(Source):
    layout = "vpo"
    tasks_supported = VPO_TASKS

    def discover(self) -> dict[str, Any]:
        self.vpo_dir = self.root / "VPO" if (self.root / "VPO").is_dir() else self.root
        found: dict[str, Path] = {}
        for task, name in CSV_NAMES.items():
            path = self.vpo_dir / task / name
            if path.is_file():
                found[task] = path
        self.csv_paths = found
        return found

    def expected_files(self) -> str:
        return "expected VPO/VPO-{SS,MS,MSMI}/vpo_*_data_stereo.csv and vggsound_bench/VGGSound/audios/"

    def _coco_names(self, rows: dict[str, list[tuple[int, dict[str, str]]]]) -> dict[int, str]:
        """COCO id -> VPO class name: CAVP's table plus the csv's own `cateId, cateName` pairs."""
        coco_names = dict(COCO_TO_VPO)
        for task, task_rows in rows.items():
            for line, row in task_rows:
                try:
                    category = int(row["cateId"])
                except ValueError:
                    continue  # reported with the row
                name = row["cateName"]
                known = coco_names.get(category)
                if known is None:
                    coco_names[category] = name
                elif known != name:
                    raise DataError(
                        f"{self.csv_paths[task]}:{line}: cateId {category} is named {name!r}, "
                        f"but COCO id {category} is {known!r} in the VPO class list"
                    )
        for category, name in coco_names.items():
            if not 0 < category < 255:
                raise DataError(f"COCO category id {category} ({name!r}) does not fit an 8-bit VPO mask")
        return coco_names

    def scan(self) -> Iterator[FrameRef | Reject]:
        rows = {task: read_csv_dicts(self.csv_paths[task], COLUMNS) for task in self.tasks}
        coco_names = self._coco_names(rows)
        for name in coco_names.values():
            self.classes.add_extra(name)  # no-op for the VPO classes, which the list has
        self.classes.finalize()
        for category, name in coco_names.items():
            self.coco_lut[category] = self.classes.id_of(name)
        self.coco_lut[0] = 0
        self.coco_lut[IGNORE_INDEX] = IGNORE_INDEX
        for task in self.tasks:
            yield from self._scan_task(task, rows[task])

    def _scan_task(self, task: str, rows: CsvRows) -> Iterator[FrameRef | Reject]:
        csv_name = relative(self.root, self.csv_paths[task])
        yield from self.bad_rows(self.csv_paths[task], rows)
        folder = relative(self.root, self.vpo_dir / task)
        ms_folder = relative(self.root, self.vpo_dir / "VPO-MS")
        groups: dict[str, list[tuple[str, dict[str, str], int, int]]] = {}
        seen: dict[tuple[int, int, str], int] = {}
        for line, row in rows:
            where = f"{csv_name}:{line}"
            try:
                image_id, annotation_id = int(row["img_Id"]), int(row["ann_Ids"])
                position = float(row["audio_pos"])
            except ValueError:
                yield Reject(where, "img_Id, ann_Ids and audio_pos must be numbers")
                continue
            if row["split"] not in SPLITS:
                yield Reject(where, f"unknown split {row['split']!r}")
                continue
            if not row["vgg_file"]:
                yield Reject(where, "empty vgg_file")
                continue
            identity = (image_id, annotation_id, row["vgg_file"])
            if identity in seen:
                yield Reject(
                    where,
                    f"duplicate row: image {image_id}, annotation {annotation_id} already listed at line {seen[identity]}",
                )
                continue
            seen[identity] = line
            row = dict(row, audio_pos=str(position))
            video = f"{image_id:012d}_{annotation_id:012d}" if task == "VPO-SS" else f"{image_id:012d}"
            groups.setdefault(video, []).append((where, row, image_id, annotation_id))
        for video, members in groups.items():
            where, first, image_id, annotation_id = members[0]
            splits = {row["split"] for _, row, _, _ in members}
            if len(splits) > 1:
                yield Reject(where, f"image {image_id} is listed in several splits {sorted(splits)}")
                continue
            image_name = f"{image_id:012d}.jpg"
            if task == "VPO-SS":
                category = first["cateName"]
                image = join(folder, "data", category, image_name)
                mask = join(folder, "mask", category, f"{image_id:012d}_{annotation_id:012d}.png")
            else:
                base = folder
                if task == "VPO-MSMI" and first.get("multi_instance", "1").strip() in ("0", "0.0"):
                    if safe_path(self.root, join(ms_folder, "data", image_name)).is_file():
                        base = ms_folder
                image = join(base, "data", image_name)
                mask = join(base, "mask", f"{image_id:012d}.png")
            audio = AudioSpec(
                paths=tuple(join(AUDIO_DIR, f"{row['vgg_file']}.wav") for _, row, _, _ in members),
                window="centre",
                crop_s=CAVP_CROP_S,
                pan=tuple(float(row["audio_pos"]) for _, row, _, _ in members)
                if self.vpo_audio == "stereo"
                else None,
            )
            yield FrameRef(
                task=task,
                subset=task,
                split=first["split"],
                video=video,
                frame=0,
                image=image,
                mask=MaskSpec(candidates=((mask, "coco"),)),
                audio=audio,
            )
