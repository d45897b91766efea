"""`ddeseg inspect`: a prepared shard folder summarised (samples per task and split, each task's
classes, the most frequent classes, the rejects), or one sample dumped for a person to look at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def inspect(shards_dir: Path, dump: str | None = None, out: Path | None = None, classes: int = 10) -> None:
    """Print the summary of `shards_dir` (`classes`: how many of the most frequent classes to
    list), or, with `dump` (a sample key), write that sample's files to `out` and print their paths."""
    from rich.console import Console
    from rich.table import Table

    from ddeseg.errors import DDESegError

    console = Console()
    if dump is not None:
        if out is None:
            raise DDESegError("--dump needs --out DIR")
        for path in dump_sample(shards_dir, dump, out):
            console.print(str(path))
        return
    summary = manifest_summary(shards_dir)
    table = Table(
        title=f"{shards_dir}: {summary['samples']} samples in {summary['shards']} shards ({summary['layout']} layout)"
    )
    for column in ("task", "split", "samples", "annotated", "silent"):
        table.add_column(column, justify="left" if column in ("task", "split") else "right")
    for (task, split), counts in summary["splits"].items():
        table.add_row(task, split, str(counts["samples"]), str(counts["annotated"]), str(counts["silent"]))
    console.print(table)
    for task, names in summary["task_classes"].items():
        console.print(f"{task}: {len(names)} classes (with background): {', '.join(names)}", markup=False)
    top = list(summary["classes"].items())[:classes]
    if top:
        console.print("most frequent classes (frames): " + ", ".join(f"{name} {count}" for name, count in top), markup=False)
    rejects = summary["rejects"]
    console.print(f"{len(rejects)} rejected")
    for reject in rejects[:10]:
        console.print(f"  {reject['path']}: {reject['reason']}", markup=False)
    if len(rejects) > 10:
        console.print(f"  ... and {len(rejects) - 10} more in rejects.jsonl")


def dump_sample(shards_dir: Path, key: str, out_dir: Path) -> list[Path]:
    """Write one sample for a person to look at: `{key}.image.png`, `{key}.mask.png` (class
    colours), `{key}.overlay.png` (mask over the frame, union box outlined), `{key}.wav`,
    `{key}.logmel.png` and `{key}.meta.json`. Returns the paths written."""
    import io

    import numpy as np
    import soundfile
    from PIL import Image, ImageDraw

    from ddeseg.classes import avss_palette
    from ddeseg.data import schema
    from ddeseg.data.shards import ShardIndex
    from ddeseg.data.stream import find_sample

    index = ShardIndex(shards_dir)
    sample, _ = find_sample(index, key)
    meta = schema.SampleMeta.from_json(sample[schema.META])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str, write: Any) -> None:
        path = out_dir / f"{key}.{name}"
        write(path)
        written.append(path)

    image = schema.decode_image(sample[schema.image_member(sample)])
    save("image.png", lambda p: Image.fromarray(image).save(p))
    overlay = Image.fromarray(image)
    if schema.MASK in sample:
        mask = schema.decode_mask(sample[schema.MASK])
        palette = avss_palette(256)
        palette[schema.IGNORE_INDEX] = (255, 255, 255)
        colours = palette[mask]
        save("mask.png", lambda p: Image.fromarray(colours).save(p))
        blend = np.where((mask > 0)[..., None], (0.5 * image + 0.5 * colours).astype(np.uint8), image)
        overlay = Image.fromarray(blend)
    if meta.union_box is not None:
        x0, y0, x1, y1 = meta.union_box
        ImageDraw.Draw(overlay).rectangle(
            [x0 * meta.width, y0 * meta.height, x1 * meta.width - 1, y1 * meta.height - 1],
            outline=(255, 255, 0),
        )
    save("overlay.png", lambda p: overlay.save(p))
    sample_rate = index.sample_rate()
    audio = schema.decode_array(sample[schema.AUDIO])
    save("wav", lambda p: soundfile.write(str(p), audio, sample_rate, subtype="FLOAT"))
    logmel = schema.decode_array(sample[schema.LOGMEL]).astype(np.float32)  # [frames, mel_bins]
    scaled = (logmel - logmel.min()) / max(float(np.ptp(logmel)), 1e-6)
    picture = (255 * scaled.T[::-1]).astype(np.uint8)  # low frequencies at the bottom
    save(
        "logmel.png",
        lambda p: Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2)).save(p),
    )
    save("meta.json", lambda p: p.write_bytes(io.BytesIO(sample[schema.META]).getvalue()))
    return written


def manifest_summary(shards_dir: Path) -> dict[str, Any]:
    """Counts per task and split (samples, annotated, silent), class frequencies, rejects."""
    from ddeseg.classes import ALL_TASKS, SPLITS
    from ddeseg.data.shards import ShardIndex

    index = ShardIndex(shards_dir)
    rows = index.manifest_rows(["task", "split", "annotated", "silent", "classes", "shard"])
    names = index.class_names()
    splits: dict[tuple[str, str], dict[str, int]] = {}
    class_counts: dict[int, int] = {}
    shards = set()
    for row in rows:
        counts = splits.setdefault((row["task"], row["split"]), {"samples": 0, "annotated": 0, "silent": 0})
        counts["samples"] += 1
        counts["annotated"] += int(row["annotated"])
        counts["silent"] += int(row["silent"])
        shards.add(row["shard"])
        for class_id in row["classes"]:
            class_counts[class_id] = class_counts.get(class_id, 0) + 1
    report = index.prepare_report()

    def order(item: tuple[tuple[str, str], Any]) -> tuple[int, int, str, str]:
        (task, split), _ = item
        return (
            ALL_TASKS.index(task) if task in ALL_TASKS else len(ALL_TASKS),
            SPLITS.index(split) if split in SPLITS else len(SPLITS),
            task,
            split,
        )

    return {
        "samples": len(rows),
        "shards": len(shards),
        "splits": dict(sorted(splits.items(), key=order)),
        "classes": {
            (names[class_id] if class_id < len(names) else str(class_id)): count
            for class_id, count in sorted(class_counts.items(), key=lambda item: -item[1])
        },
        "num_classes": len(names),
        # Each task's own classes (its training ids), not the unified list of the folder.
        "task_classes": {task: index.task_class_names(task) for task in sorted({t for t, _ in splits}, key=lambda t: ALL_TASKS.index(t) if t in ALL_TASKS else len(ALL_TASKS))},
        "rejects": index.rejects(),
        "layout": report.get("layout"),
        "root": report.get("root"),
    }
