"""The memory bank stage: per-class FAISS K-Means, fill rules, the embeddings cache, the
embedding pass over hand-written shards with a known embedding, and the CLI on a cache."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from ddeseg.config import Config
from ddeseg.data import schema
from ddeseg.data.schema import SampleMeta, encode_array
from ddeseg.errors import DDESegError
from ddeseg.pipelines.build_memory_bank import (
    BANK_FILE,
    BANK_JSON,
    CACHE_FILE,
    EmbeddingTable,
    MemoryBankPaths,
    MemoryBankWarning,
    assign_to_classes,
    build_memory_bank,
    cluster_class_embeddings,
    read_embeddings_cache,
    resolve_faiss_device,
    state_dict_fingerprint,
    write_embeddings_cache,
)
from ddeseg.stage import RunOptions

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def gaussian_classes(
    classes: int, points: int, dim: int, spread: float = 1.0, seed: int = 0
) -> dict[int, np.ndarray]:
    """Well-separated classes: each a blob of 4 sub-modes around its own far-away centre."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for class_id in range(1, classes + 1):
        centre = rng.normal(0, 20, dim)
        modes = centre + rng.normal(0, 3, (4, dim))
        which = rng.integers(0, 4, points)
        by_class[class_id] = (modes[which] + rng.normal(0, spread, (points, dim))).astype(np.float32)
    return by_class


def assert_centroids_nearest_own_class(
    bank: np.ndarray, rows: list[int], by_class: dict[int, np.ndarray]
) -> None:
    """Every centroid of class c is nearer to c's embeddings than to any other class's."""
    for row, class_id in enumerate(rows):
        for centroid in bank[row]:
            nearest = {c: np.linalg.norm(points - centroid, axis=1).min() for c, points in by_class.items()}
            others = min(d for c, d in nearest.items() if c != class_id)
            assert nearest[class_id] < others, (class_id, nearest)


N_MELS, FRAMES, DIM = 8, 6, 5
# Known embedding: a fixed projection of the time-averaged log-mel.
PROJECTION = torch.from_numpy(np.random.default_rng(7).normal(0, 1, (N_MELS, DIM)).astype(np.float32))


class CountingEmbedder:
    def __init__(self) -> None:
        self.calls = 0
        self.clips = 0

    def __call__(self, logmel: torch.Tensor) -> torch.Tensor:
        assert logmel.dtype == torch.float32 and logmel.shape[1:] == (FRAMES, N_MELS)
        self.calls += 1
        self.clips += logmel.shape[0]
        return logmel.mean(dim=1) @ PROJECTION


def _forbidden_embedder(logmel: torch.Tensor) -> torch.Tensor:
    raise AssertionError("embed_fn must not be called when the cache is reused")


def _logmel(class_ids: list[int], rng: np.random.Generator, frames: int, mels: int) -> np.ndarray:
    """A log-mel whose mel profile is the sum of one bump per class (class c at mel bin 2c)."""
    profile = np.zeros(mels, dtype=np.float32)
    for class_id in class_ids:
        profile[(2 * class_id) % mels] += 10.0
    return (profile + rng.normal(0, 0.3, (frames, mels))).astype(np.float16)


def write_tiny_shards(
    root: Path, per_class: int = 6, frames: int = FRAMES, mels: int = N_MELS
) -> dict[str, int]:
    """A prepared directory with classes.json and two train shards of task `v2`:
    `per_class` single-source samples of classes 1..3, two multi-source (1+2), three silent,
    two unannotated, one of class 4 (`other`, not a bank row of the task)."""
    names = ["background", "alpha", "beta", "gamma", "other"]
    (root / schema.CLASSES_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / schema.CLASSES_FILE).write_text(
        json.dumps(
            {
                "names": names,
                "background": 0,
                "ignore_index": 255,
                "avss_classes": 4,
                "tasks": {"v2": {"binary": False, "num_classes": 4, "reads": ["v2"], "ids": [0, 1, 2, 3]}},
            }
        )
    )
    rng = np.random.default_rng(0)
    plan: list[tuple[list[int], bool, bool]] = []  # classes, annotated, silent
    plan += [([c], True, False) for c in (1, 2, 3) for _ in range(per_class)]
    plan += (
        [([1, 2], True, False)] * 2
        + [([], True, True)] * 3
        + [([2], False, False)] * 2
        + [([4], True, False)]
    )
    samples = []
    for index, (classes, annotated, silent) in enumerate(plan):
        key = schema.sample_key("v2", f"vid{index:03d}", 0)
        meta = SampleMeta(
            key=key, task="v2", subset="v2", split="train", video=f"vid{index:03d}", frame=0,
            height=4, width=4, annotated=annotated, silent=silent, classes=classes if annotated else [],
        )  # fmt: skip
        samples.append(
            {
                "__key__": key,
                schema.META: meta.to_json(),
                schema.LOGMEL: encode_array(_logmel(classes, rng, frames, mels)),
            }
        )
    order = rng.permutation(len(samples))  # shards are not sorted by class
    samples = [samples[i] for i in order]
    split = root / "v2" / "train"
    split.mkdir(parents=True, exist_ok=True)
    half = len(samples) // 2
    for shard_index, chunk in enumerate((samples[:half], samples[half:])):
        with TarWriter(str(split / schema.SHARD_NAME.format(index=shard_index)), encoder=False) as writer:
            for sample in chunk:
                writer.write(sample)
    return {"samples": len(plan), "unannotated": 2, "silent": 3, "multi": 2, "outside": 1}


# --------------------------------------------------------------------------------------------
# Clustering core
# --------------------------------------------------------------------------------------------


def test_centroids_lie_nearest_their_own_class():
    by_class = gaussian_classes(classes=4, points=80, dim=16)
    bank, stats = cluster_class_embeddings(by_class, k=6, niter=20, seed=0)
    assert bank.shape == (4, 6, 16) and bank.dtype == np.float32
    assert [s.class_id for s in stats] == [1, 2, 3, 4]
    assert all(s.fill == "kmeans" and s.points == 80 and s.effective_k == 6 for s in stats)
    assert_centroids_nearest_own_class(bank, [1, 2, 3, 4], by_class)
    # K-Means fits better than the class mean alone.
    for entry, (class_id, points) in zip(stats, by_class.items(), strict=True):
        assert entry.inertia < ((points - points.mean(0)) ** 2).sum() * 0.8, class_id


def test_all_points_are_used_not_a_faiss_subsample():
    # 2 far-apart blobs of 1,000 points with k=2: the exact K-Means centroids are the blob means.
    # FAISS's default (256 points per centroid) would train on 512 points and miss them by ~0.05.
    rng = np.random.default_rng(1)
    blobs = [rng.normal(0, 1, (1000, 8)), rng.normal(40, 1, (1000, 8))]
    points = np.concatenate(blobs).astype(np.float32)
    bank, stats = cluster_class_embeddings({5: points}, k=2, niter=10, seed=3)
    centroids = bank[0][np.argsort(bank[0][:, 0])]
    np.testing.assert_allclose(centroids, np.stack([b.mean(0) for b in blobs]), atol=1e-4)
    assert stats[0].points == 2000


def test_same_seed_same_bank_other_seed_other_bank():
    by_class = gaussian_classes(classes=3, points=120, dim=12, spread=4.0, seed=2)
    first, _ = cluster_class_embeddings(by_class, k=8, niter=15, seed=11)
    second, _ = cluster_class_embeddings(by_class, k=8, niter=15, seed=11)
    other, _ = cluster_class_embeddings(by_class, k=8, niter=15, seed=12)
    assert first.tobytes() == second.tobytes()
    assert not np.array_equal(first, other)


def test_class_with_fewer_than_k_points_is_its_points_then_its_mean():
    by_class = gaussian_classes(classes=2, points=50, dim=6)
    few = np.arange(18, dtype=np.float32).reshape(3, 6)
    by_class[7] = few
    with pytest.warns(MemoryBankWarning, match=r"class 7 \('seven'\) has 3 point\(s\) < k=5"):
        bank, stats = cluster_class_embeddings(by_class, k=5, class_ids=[1, 2, 7], class_names={7: "seven"})
    np.testing.assert_array_equal(bank[2, :3], few)
    np.testing.assert_allclose(bank[2, 3:], np.repeat(few.mean(0, keepdims=True), 2, axis=0))
    np.testing.assert_allclose(bank[2].mean(0), few.mean(0), rtol=1e-6)  # the row mean is the class mean
    assert (stats[2].points, stats[2].effective_k, stats[2].fill) == (3, 3, "points+class_mean")


def test_class_without_points_is_an_error_unless_allowed():
    by_class = gaussian_classes(classes=2, points=30, dim=4)
    with pytest.raises(DDESegError, match=r"class 9 \('nine'\)"):
        cluster_class_embeddings(by_class, k=3, class_ids=[1, 2, 9], class_names={9: "nine"})
    with pytest.warns(MemoryBankWarning, match=r"class 9 \('nine'\) has no embedding"):
        bank, stats = cluster_class_embeddings(
            by_class, k=3, class_ids=[1, 2, 9], class_names={9: "nine"}, allow_missing=True
        )
    global_mean = np.concatenate([by_class[1], by_class[2]]).mean(0)
    np.testing.assert_allclose(bank[2], np.repeat(global_mean[None], 3, axis=0), rtol=1e-5)
    assert stats[2].missing and stats[2].fill == "global_mean" and stats[2].effective_k == 0
    zeros, _ = cluster_class_embeddings(
        by_class, k=3, class_ids=[0, 1, 2], optional_classes=(0,), missing_fill="zeros"
    )
    assert not zeros[0].any()


def test_spherical_gives_unit_centroids():
    by_class = gaussian_classes(classes=2, points=60, dim=8)
    bank, _ = cluster_class_embeddings(by_class, k=4, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=-1), 1.0, atol=1e-5)


def test_explicit_gpu_without_faiss_gpus_is_a_clear_error():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a FAISS GPU")
    with pytest.raises(DDESegError, match="FAISS sees 0 GPU"):
        resolve_faiss_device(torch.device("cuda:0"))
    with pytest.warns(MemoryBankWarning, match="clustering on the CPU"):
        assert resolve_faiss_device(torch.device("cuda:0"), explicit=False) is None  # --device auto
    assert resolve_faiss_device(torch.device("cpu")) is None


# --------------------------------------------------------------------------------------------
# Cache, assignment, fingerprint
# --------------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    table = EmbeddingTable(
        keys=["a", "b", "c"],
        classes=[[1], [1, 2], []],
        silent=np.array([False, False, True]),
        embeddings=np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32),
        unannotated=4,
    )
    write_embeddings_cache(tmp_path / CACHE_FILE, table, {"task": "v2", "shards": [["x.tar", 1]]})
    assert not list(tmp_path.glob(".*tmp*"))
    back, metadata = read_embeddings_cache(tmp_path / CACHE_FILE)
    assert back.keys == table.keys and back.classes == table.classes and back.unannotated == 4
    np.testing.assert_array_equal(back.silent, table.silent)
    np.testing.assert_array_equal(back.embeddings, table.embeddings)
    assert metadata["task"] == "v2" and metadata["dim"] == 7


def test_assignment_rules():
    table = EmbeddingTable(
        keys=list("abcdef"),
        classes=[[1], [2], [1, 2], [], [9], [1, 9]],
        silent=np.array([False, False, False, True, False, False]),
        embeddings=np.arange(12, dtype=np.float32).reshape(6, 2),
    )
    single = assign_to_classes(table, [0, 1, 2])
    assert {c: len(v) for c, v in single.by_class.items()} == {1: 1, 2: 1}
    assert single.counts["outside_bank"] == 1 and single.outside_bank == {9: 1}
    multi = assign_to_classes(table, [0, 1, 2], include_multi_source=True, silence_row=True)
    assert {c: len(v) for c, v in multi.by_class.items()} == {0: 1, 1: 3, 2: 2}
    np.testing.assert_array_equal(multi.by_class[1], table.embeddings[[0, 2, 5]])
    assert multi.counts["multi_source"] == 2 and multi.counts["multi_source_used"] == 2
    assert multi.counts["silent_used"] == 1


def test_state_dict_fingerprint_changes_with_weights():
    module = torch.nn.Linear(3, 2)
    first = state_dict_fingerprint(module.state_dict())
    assert state_dict_fingerprint(module.state_dict()) == first
    with torch.no_grad():
        module.weight[0, 0] += 1e-3
    assert state_dict_fingerprint(module.state_dict()) != first


# --------------------------------------------------------------------------------------------
# The stage on hand-written shards with a known embedding
# --------------------------------------------------------------------------------------------


def build_bank(
    shards, out, *, config=None, task=None, audio_checkpoint=None, reuse_embeddings=False, device=None,
    progress=True, embed_fn=None, embed_fingerprint=None, **settings,
):  # fmt: skip
    """`build_memory_bank` with its inputs spelt out: `settings` are keys of `config.memory_bank`
    (k, niter, spherical, ...), `task` the config's task."""
    config = copy.deepcopy(config or Config())
    config.task = task or config.task
    for key, value in settings.items():
        assert hasattr(config.memory_bank, key), key
        setattr(config.memory_bank, key, value)
    paths = MemoryBankPaths(shards, out, audio_checkpoint=audio_checkpoint, reuse_embeddings=reuse_embeddings)
    return build_memory_bank(
        config, paths, RunOptions(device=device, progress=progress), embed_fn=embed_fn, embed_fingerprint=embed_fingerprint
    )



def test_stage_on_tiny_shards_with_a_known_embedding(tmp_path):
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    expected = write_tiny_shards(shards, per_class=6)
    embedder = CountingEmbedder()
    result = build_bank(
        shards, bank_dir, k=2, task="v2", embed_fn=embedder, embed_fingerprint="proj-1", batch_size=4,
        device="cpu", progress=False,
    )  # fmt: skip
    assert embedder.clips == expected["samples"] - expected["unannotated"]
    bank = np.load(bank_dir / BANK_FILE, allow_pickle=False)
    assert bank.shape == (4, 2, DIM) and bank.dtype == np.float32
    report = json.loads((bank_dir / BANK_JSON).read_text())
    assert report["shape"] == [4, 2, DIM] and report["embedding"]["fingerprint"] == "proj-1"
    assert [(c["class_id"], c["name"], c["points"]) for c in report["classes"]] == [
        (0, "background", 0), (1, "alpha", 6), (2, "beta", 6), (3, "gamma", 6),
    ]  # fmt: skip
    assert report["classes"][0]["fill"] == "global_mean"  # background row without --silence-row
    assert report["samples"]["unannotated_skipped"] == 2 and report["samples"]["silent"] == 3
    assert report["samples"]["multi_source"] == 2 and report["samples"]["multi_source_used"] == 0
    assert report["outside_bank"] == {"other": 1}
    assert report["faiss"]["version"] and report["shards"][0][0] == "v2/train/shard-000000.tar"
    assert not list(bank_dir.glob(".*tmp*"))

    # The known embedding of each single-source sample, by class.
    table, _ = read_embeddings_cache(bank_dir / CACHE_FILE)
    by_class = {
        c: table.embeddings[[i for i, cl in enumerate(table.classes) if cl == [c]]] for c in (1, 2, 3)
    }
    assert_centroids_nearest_own_class(bank[1:], [1, 2, 3], by_class)

    # Re-clustering from the cache: no embedding, and the same settings give the same bytes.
    again = build_bank(
        shards, bank_dir, k=2, task="v2", reuse_embeddings=True, embed_fn=_forbidden_embedder,
        device="cpu", progress=False,
    )  # fmt: skip
    assert again.reused_embeddings and (bank_dir / BANK_FILE).read_bytes() == result.bank_path.read_bytes()
    assert json.loads((bank_dir / BANK_JSON).read_text())["embedding"]["fingerprint"] == "proj-1"

    # Another k and the assignment options from the same cache; too few points -> warning.
    with pytest.warns(MemoryBankWarning, match="'background'.* has 3 point"):
        wider = build_bank(
            shards, bank_dir, k=4, task="v2", reuse_embeddings=True, embed_fn=_forbidden_embedder,
            include_multi_source=True, silence_row=True, device="cpu", progress=False,
        )  # fmt: skip
    assert wider.shape == (4, 4, DIM)
    assert [s.points for s in wider.stats] == [3, 8, 8, 6]
    assert embedder.calls > 0 and embedder.clips == expected["samples"] - expected["unannotated"]


def test_reuse_refuses_a_missing_or_stale_cache(tmp_path):
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=3)
    with pytest.raises(DDESegError, match="no embeddings cache"):
        build_bank(shards, bank_dir, k=1, reuse_embeddings=True, device="cpu", progress=False)
    build_bank(
        shards,
        bank_dir,
        k=1,
        embed_fn=CountingEmbedder(),
        embed_fingerprint="a",
        device="cpu",
        progress=False,
    )
    with pytest.raises(DDESegError, match="embedded by model 'a'"):
        build_bank(
            shards, bank_dir, k=1, reuse_embeddings=True, embed_fingerprint="b", device="cpu", progress=False
        )
    extra = shards / "v2" / "train" / "shard-000002.tar"
    extra.write_bytes((shards / "v2" / "train" / "shard-000000.tar").read_bytes())
    with pytest.raises(DDESegError, match="differ"):
        build_bank(shards, bank_dir, k=1, reuse_embeddings=True, device="cpu", progress=False)


def test_missing_class_in_shards_is_an_error_unless_allowed(tmp_path):
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=3)
    document = json.loads((shards / schema.CLASSES_FILE).read_text())
    document["names"].append("never-heard")  # id 5: a bank row without any sample
    document["tasks"]["v2"]["ids"] = [0, 1, 2, 3, 4, 5]  # `other` (id 4, one sample) becomes a row too
    (shards / schema.CLASSES_FILE).write_text(json.dumps(document))
    kwargs = dict(k=1, task="v2", embed_fn=CountingEmbedder(), device="cpu", progress=False)
    with pytest.raises(DDESegError, match=r"class 5 \('never-heard'\)"):
        build_bank(shards, bank_dir, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build_bank(shards, bank_dir, allow_missing_classes=True, **kwargs)
    assert any("never-heard" in str(w.message) for w in caught)
    assert result.shape[0] == 6 and result.stats[5].missing and result.stats[4].points == 1


class _FakeDDESeg(torch.nn.Module):
    """Stands in for `ddeseg.models` (build_model, load_checkpoint, embed_audio) to test the
    wiring of the production embedder: checkpoint loading, freezing, fingerprint."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_backbone = torch.nn.Linear(N_MELS, DIM)
        self.head = torch.nn.Linear(2, 2)

    def embed_audio(self, logmel: torch.Tensor) -> torch.Tensor:
        assert not self.training and not self.audio_backbone.weight.requires_grad
        return self.audio_backbone(logmel.mean(dim=1))


def _fake_models_module():
    import types

    from ddeseg.config import ModelConfig

    module = types.ModuleType("ddeseg.models")

    def build_model(model_config):
        assert isinstance(model_config, ModelConfig)
        return _FakeDDESeg()

    def load_checkpoint(model, path):
        model.load_state_dict(torch.load(path, weights_only=True))

    module.build_model, module.load_checkpoint = build_model, load_checkpoint
    return module


def test_cli_with_the_model_embedder_and_its_fingerprint(tmp_path, monkeypatch):
    import sys

    import ddeseg.models.frontend  # noqa: F401  (check_frontend imports it while the fake package stands)
    from ddeseg.cli.app import main

    monkeypatch.setitem(sys.modules, "ddeseg.models", _fake_models_module())
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=4)
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _FakeDDESeg()
        checkpoints.append(
            (tmp_path / f"audio{seed}.pt", state_dict_fingerprint(model.audio_backbone.state_dict()))
        )
        torch.save(model.state_dict(), checkpoints[-1][0])
    argv = ["ddeseg", "build-memory-bank", "--shards", str(shards), "--k", "2", "--out", str(bank_dir)]
    argv += ["--task", "v2", "--device", "cpu", "--quiet"]
    monkeypatch.setattr("sys.argv", argv + ["--audio-checkpoint", str(checkpoints[0][0])])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    report = json.loads((bank_dir / BANK_JSON).read_text())
    assert report["embedding"]["fingerprint"] == checkpoints[0][1]
    assert report["embedding"]["fingerprint_of"] == "audio_backbone.state_dict()"
    assert np.load(bank_dir / BANK_FILE).shape == (4, 2, DIM)

    # Reusing the cache with another checkpoint is refused.
    monkeypatch.setattr(
        "sys.argv", argv + ["--reuse-embeddings", "--audio-checkpoint", str(checkpoints[1][0])]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2


@pytest.mark.slow  # the tiny model embeds 12 clips and runs twice on a CPU (~10 s)
def test_bank_of_the_real_tiny_model_loads_into_it_and_changes_its_output(tmp_path, monkeypatch):
    import ddeseg.models
    from ddeseg.config import load_config
    from ddeseg.models.frontend import frames_for

    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    frontend = config.model.frontend
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    frames = frames_for(frontend, frontend.sample_rate)
    write_tiny_shards(shards, per_class=2, frames=frames, mels=frontend.mel_bins)
    torch.manual_seed(0)
    model = ddeseg.models.build_model(config.model)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    audio_fingerprint = state_dict_fingerprint(model.audio_model.state_dict())
    with torch.no_grad():  # the embedder must load the checkpoint: start it from other audio weights
        for parameter in model.audio_model.parameters():
            parameter.add_(0.01)
    # One build of the tiny model (seconds on a CPU) serves the embedder and the forward below.
    monkeypatch.setattr(ddeseg.models, "build_model", lambda model_config: model)

    result = build_bank(
        shards,
        bank_dir,
        k=2,
        config=config,
        audio_checkpoint=checkpoint,
        task="v2",
        device="cpu",
        progress=False,
    )
    assert result.shape == (4, 2, config.model.audio_embed_dim)
    assert result.report["embedding"]["fingerprint"] == audio_fingerprint  # the checkpoint's weights
    assert result.report["embedding"]["fingerprint_of"] == "audio_model.state_dict()"
    banks = [np.load(result.bank_path)]
    spherical = build_bank(
        shards, bank_dir, k=2, config=config, task="v2", reuse_embeddings=True, spherical=True, device="cpu",
        progress=False,
    )  # fmt: skip
    banks.append(np.load(spherical.bank_path))
    assert not np.allclose(banks[0], banks[1])

    generator = torch.Generator().manual_seed(1)
    image, waveform = (
        torch.randn(1, 3, 64, 64, generator=generator),
        torch.randn(1, 22050, generator=generator),
    )
    outputs = []
    for bank in banks:
        model.set_memory_bank(bank)
        with torch.no_grad():
            outputs.append(model(image, waveform))
    assert not torch.allclose(outputs[0], outputs[1])


# --------------------------------------------------------------------------------------------
# CLI (on a cache: no model needed)
# --------------------------------------------------------------------------------------------


def test_cli_reclusters_a_cache_and_reports_bad_input(tmp_path, monkeypatch, capsys):
    from ddeseg.cli.app import main

    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=4)
    build_bank(
        shards, bank_dir, k=2, task="v2", embed_fn=CountingEmbedder(), device="cpu", progress=False
    )
    argv = ["ddeseg", "build-memory-bank", "--shards", str(shards), "--k", "3", "--out", str(bank_dir)]
    monkeypatch.setattr(
        "sys.argv", argv + ["--reuse-embeddings", "--task", "v2", "--device", "cpu", "--quiet"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert np.load(bank_dir / BANK_FILE).shape == (4, 3, DIM)

    monkeypatch.setattr(
        "sys.argv", argv[:3] + [str(tmp_path / "nowhere")] + argv[4:] + ["--reuse-embeddings"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "classes.json is missing" in capsys.readouterr().err
