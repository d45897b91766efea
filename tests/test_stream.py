"""Streaming loaders on tiny shards written here with `webdataset.TarWriter` and the schema encoders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from ddeseg.config import Config
from ddeseg.data import schema
from ddeseg.data.augment import resize_mask
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import (
    count_data_errors,
    make_eval_loader,
    make_train_loader,
    read_data_errors,
)
from ddeseg.errors import DataError

FRAMES, MEL_BINS, SIZE = 12, 16, 32
# Unified ids used by the samples; the task "v2" keeps 0..5 and maps unified 7 -> task id 6.
UNIFIED_IDS = (1, 2, 3, 7)


def tiny_config(**data) -> Config:
    cfg = Config(task="v2")
    cfg.model.num_classes = 8
    cfg.model.frontend.mel_bins = MEL_BINS
    cfg.data.image_size = SIZE
    cfg.data.batch_size = 2
    cfg.data.eval_batch_size = 3
    cfg.data.shuffle_buffer = 6
    cfg.data.num_workers = 0
    for name, value in data.items():
        setattr(cfg.data, name, value)
    return cfg


def make_sample(key: str, rng: np.random.Generator, annotated: bool = True) -> tuple[dict, np.ndarray]:
    """One shard sample (members) with a random image and a one-box mask; returns the raw mask."""
    height, width = int(rng.integers(36, 56)), int(rng.integers(36, 56))
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    class_id = int(rng.choice(UNIFIED_IDS))
    y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    y1, x1 = y0 + int(rng.integers(4, height // 2)), x0 + int(rng.integers(4, width // 2))
    mask[y0:y1, x0:x1] = class_id
    box = [x0 / width, y0 / height, x1 / width, y1 / height]
    meta = schema.SampleMeta(
        key=key, task="v2", subset="v2", split="train", video=key[:-4], frame=int(key[-3:]),
        height=height, width=width, annotated=annotated, silent=False,
        classes=[class_id], union_box=box, class_boxes={str(class_id): box}, image_ext="png",
    )
    members = {
        "__key__": key,
        "image.png": encode_png(image),
        "logmel.npy": schema.encode_array(rng.standard_normal((FRAMES, MEL_BINS)).astype(np.float16)),
        "meta.json": meta.to_json(),
    }
    if annotated:
        members["mask.png"] = schema.encode_mask(mask)
    return members, mask


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory: Path, sizes: list[int], seed: int = 0, unannotated_every: int = 0) -> dict:
    """Shards of the given sizes under `directory`; returns {key: raw mask} of every sample."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    masks, counter = {}, 0
    for index, size in enumerate(sizes):
        with TarWriter(str(directory / schema.SHARD_NAME.format(index=index))) as writer:
            for _ in range(size):
                key = f"v2-vid{counter // 10:03d}-{counter % 10:03d}"
                annotated = not (unannotated_every and counter % unannotated_every == unannotated_every - 1)
                members, mask = make_sample(key, rng, annotated=annotated)
                writer.write(members)
                masks[key] = mask
                counter += 1
    return masks


def write_classes(root: Path) -> None:
    names = ["background"] + [f"class{i}" for i in range(1, 8)]
    classes = {
        "names": names,
        "tasks": {
            "v2": {"binary": False, "num_classes": 7, "reads": ["v2"], "ids": [0, 1, 2, 3, 4, 5, 7]},
            "v1s": {"binary": True, "num_classes": 1, "reads": ["v1s"], "ids": None},
        },
    }
    (root / schema.CLASSES_FILE).write_text(json.dumps(classes))


def collect_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


# --------------------------------------------------------------------------------------------


def test_train_batches_shapes_and_dtypes(tmp_path):
    write_shards(tmp_path / "v2" / "train", [5, 4])
    (tmp_path / "v2" / "train" / ".shard-000002.tar.partial.tar").write_bytes(b"unfinished")  # ignored
    cfg = tiny_config()
    loader = make_train_loader(tmp_path / "v2" / "train", cfg, seed=0, num_batches=3, errors_dir=tmp_path / "errors")
    batches = list(loader)
    assert len(batches) == 3
    assert not read_data_errors(tmp_path / "errors")
    for batch in batches:
        assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (2, SIZE, SIZE) and batch["mask"].dtype == torch.int64
        assert batch["logmel"].shape == (2, 1, FRAMES, MEL_BINS) and batch["logmel"].dtype == torch.float32
        assert len(batch["key"]) == 2 and len(batch["classes"]) == 2
        assert batch["orig_size"].shape == (2, 2)
        assert batch["frame"].tolist() == [int(key[-3:]) for key in batch["key"]]
        assert batch["video"] == [key[:-4] for key in batch["key"]]  # meta.video of make_sample
        # ImageNet normalisation of uniform noise: values around 0, spanning beyond [0, 1].
        assert batch["image"].min() < -1.0 and batch["image"].max() > 1.5
        assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 7}


def test_masks_exact_after_decode_and_label_map(tmp_path):
    """Mask ids survive decoding exactly: the loader's mask is the raw mask mapped and resized."""
    root = tmp_path / "shards"
    masks = write_shards(root / "v2" / "val", [4])
    write_classes(root)
    cfg = tiny_config()
    lut = ShardIndex(root, need_manifest=False).label_lut(cfg.task, cfg.model.num_classes)
    assert lut[7] == 6 and lut[3] == 3 and lut[6] == schema.IGNORE_INDEX and lut[255] == 255
    loader = make_eval_loader(root / "v2" / "val", cfg, batch_size=1, label_lut=lut)
    for batch in loader:
        key = batch["key"][0]
        raw = masks[key]
        expected = resize_mask(lut[raw], SIZE).astype(np.int64)
        np.testing.assert_array_equal(batch["mask"][0].numpy(), expected)
        assert set(np.unique(expected).tolist()) == {0, int(lut[raw.max()])}
        assert batch["classes"][0] == [int(lut[raw.max()])]


def test_binary_task_masks_are_zero_one(tmp_path):
    root = tmp_path / "shards"
    write_shards(root / "v1s" / "train", [4])
    write_classes(root)
    cfg = tiny_config()
    cfg.task, cfg.model.num_classes = "v1s", 1
    batch = next(iter(make_train_loader(root / "v1s" / "train", cfg, seed=1, num_batches=1)))
    values = set(batch["mask"].unique().tolist())
    assert values == {0, 1}
    assert batch["classes"] == [[1], [1]]


def test_eval_every_key_once_in_order_and_across_two_ranks(tmp_path):
    masks = write_shards(tmp_path, [5, 2, 4], unannotated_every=0)
    cfg = tiny_config()
    every = list(masks)  # written order = sorted shard order
    assert collect_keys(make_eval_loader(tmp_path, cfg)) == every
    rank_keys = [collect_keys(make_eval_loader(tmp_path, cfg, rank=r, world_size=2)) for r in range(2)]
    assert sorted(rank_keys[0] + rank_keys[1]) == sorted(every)
    assert not set(rank_keys[0]) & set(rank_keys[1])
    assert rank_keys[0] == every[0::2] and rank_keys[1] == every[1::2]  # in order within a rank
    # More ranks than shards still covers everything exactly once.
    five = [collect_keys(make_eval_loader(tmp_path, cfg, rank=r, world_size=5)) for r in range(5)]
    assert sorted(k for keys in five for k in keys) == sorted(every)


def test_eval_with_two_workers_keeps_order(tmp_path):
    masks = write_shards(tmp_path, [4, 3, 5])
    cfg = tiny_config()
    loader = make_eval_loader(tmp_path, cfg, num_workers=2, batch_size=2)
    assert collect_keys(loader) == list(masks)


def test_eval_skips_unannotated_unless_asked(tmp_path):
    masks = write_shards(tmp_path, [6], unannotated_every=3)
    cfg = tiny_config()
    annotated = collect_keys(make_eval_loader(tmp_path, cfg))
    assert len(annotated) == 4
    batches = list(make_eval_loader(tmp_path, cfg, annotated_only=False))
    assert [k for b in batches for k in b["key"]] == list(masks)
    flags = torch.cat([b["annotated"] for b in batches]).tolist()
    assert flags == [True, True, False, True, True, False]
    unannotated = torch.cat([b["mask"] for b in batches])[2]
    assert (unannotated == schema.IGNORE_INDEX).all()


def test_train_skips_unannotated(tmp_path):
    masks = write_shards(tmp_path, [6], unannotated_every=2)
    cfg = tiny_config()
    keys = collect_keys(make_train_loader(tmp_path, cfg, seed=0, num_batches=6))
    unannotated = {k for i, k in enumerate(masks) if i % 2 == 1}
    assert keys and not set(keys) & unannotated


def test_two_ranks_take_equal_steps_on_unequal_shards(tmp_path):
    write_shards(tmp_path, [7, 1, 2])
    cfg = tiny_config()
    steps = []
    for rank in range(2):
        loader = make_train_loader(tmp_path, cfg, seed=3, rank=rank, world_size=2, num_batches=5)
        steps.append(sum(1 for _ in loader))
    assert steps == [5, 5]
    # The ranks see different streams.
    keys = [collect_keys(make_train_loader(tmp_path, cfg, seed=3, rank=r, world_size=2, num_batches=4)) for r in range(2)]
    assert keys[0] != keys[1]


def test_train_is_deterministic_per_seed_epoch_rank(tmp_path):
    write_shards(tmp_path, [4, 5])
    cfg = tiny_config()
    cfg.data.augment.spec_augment = True

    def run(**kw):
        return list(make_train_loader(tmp_path, cfg, num_batches=4, **kw))

    first, again = run(seed=5, epoch=1), run(seed=5, epoch=1)
    for a, b in zip(first, again, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["logmel"], b["logmel"])
    other_epoch = run(seed=5, epoch=2)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other_epoch, strict=True))


def test_building_a_loader_leaves_global_rng_alone(tmp_path):
    write_shards(tmp_path, [3])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(make_train_loader(tmp_path, tiny_config(), seed=0, num_batches=2))
    assert torch.equal(torch.rand(3), expected)


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [4, 4, 4])
    bad = shards / "shard-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    # Cut on a block boundary: Python's tarfile takes that for a clean end of the archive.
    aligned = shards / "shard-000002.tar"
    aligned.write_bytes(aligned.read_bytes()[: 512 * 40])
    (shards / "shard-000003.tar").write_bytes(b"this is not a tar file" * 40)
    errors_dir = tmp_path / "errors"
    cfg = tiny_config()
    batches = list(make_train_loader(shards, cfg, seed=0, num_batches=12, errors_dir=errors_dir))
    assert len(batches) == 12
    records = read_data_errors(errors_dir)
    assert count_data_errors(errors_dir) >= 2
    assert {r["shard"] for r in records} == {str(bad), str(aligned), str(shards / "shard-000003.tar")}
    assert all(r["reason"] for r in records)
    # Evaluation on the same shards also completes, with every intact sample once.
    eval_keys = collect_keys(make_eval_loader(shards, cfg, errors_dir=errors_dir))
    assert len(eval_keys) == len(set(eval_keys)) >= 4


def test_corrupt_sample_is_logged_with_its_key(tmp_path):
    rng = np.random.default_rng(0)
    with TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        for index in range(4):
            members, _ = make_sample(f"v2-vid000-{index:03d}", rng)
            if index == 2:
                members["image.png"] = b"\x89PNG broken"
            writer.write(members)
    errors_dir = tmp_path / "errors"
    keys = collect_keys(make_eval_loader(tmp_path, tiny_config(), errors_dir=errors_dir))
    assert keys == ["v2-vid000-000", "v2-vid000-001", "v2-vid000-003"]
    (record,) = read_data_errors(errors_dir)
    assert record["key"] == "v2-vid000-002" and record["shard"].endswith("shard-000000.tar")
    assert count_data_errors(errors_dir) == 1


def test_all_corrupt_training_data_raises_instead_of_hanging(tmp_path, monkeypatch):
    import ddeseg.data.stream as stream

    monkeypatch.setattr(stream, "MAX_FRUITLESS", 50)
    (tmp_path / "shard-000000.tar").write_bytes(b"garbage" * 100)
    cfg = tiny_config(shuffle_buffer=1)
    with pytest.raises(DataError, match="without a usable"):
        list(make_train_loader(tmp_path, cfg, seed=0, num_batches=2))


def test_train_with_two_workers(tmp_path):
    write_shards(tmp_path, [3, 4, 2])
    errors_dir = tmp_path / "errors"
    cfg = tiny_config()
    loader = make_train_loader(tmp_path, cfg, seed=0, num_batches=5, num_workers=2, errors_dir=errors_dir)
    first = list(loader)
    assert len(first) == 5
    again = list(make_train_loader(tmp_path, cfg, seed=0, num_batches=5, num_workers=2))
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert count_data_errors(errors_dir) == 0
