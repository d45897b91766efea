"""The official DDESeg bbox json, written by `prepare` from the manifest's boxes
(`ddeseg.data.boxes` computes them, in the official convention documented there).

`export_bbox_json` writes the official form: a json object `uid -> box or null`, one key per
sample of the task family, where uid is `{video}_{frame}` for the AVSS tasks
(`avss_bbox_orisize.json`, the DDESeg loader looks up `video + "_" + frame`) and the mask path
relative to the raw root for the VPO tasks (`vpo_bbox_orisize.json`; the official file keys the
authors' absolute mask paths).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ddeseg.data.boxes import Box
from ddeseg.fileio import write_bytes_atomic

AVSS_BBOX_JSON = "avss_bbox_orisize.json"
VPO_BBOX_JSON = "vpo_bbox_orisize.json"


def official_uid(task: str, video: str, frame: int, mask_path: str | None) -> str:
    """The key the official loaders use for a sample's box (see the module docstring)."""
    if task.startswith("VPO-"):
        return mask_path or f"{video}_{frame}"
    return f"{video}_{frame}"


def export_bbox_json(rows: Iterable[dict], out_dir: Path) -> list[Path]:
    """Write the official bbox json(s) from manifest rows (`task, video, frame, source_mask,
    union_box`); returns the files written (one per task family present)."""
    families: dict[str, dict[str, Box | None]] = {}
    for row in rows:
        name = VPO_BBOX_JSON if row["task"].startswith("VPO-") else AVSS_BBOX_JSON
        uid = official_uid(row["task"], row["video"], row["frame"], row.get("source_mask"))
        families.setdefault(name, {})[uid] = row["union_box"]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, boxes in sorted(families.items()):
        path = out_dir / name
        write_bytes_atomic(path, json.dumps(dict(sorted(boxes.items())), indent=0).encode())
        written.append(path)
    return written
