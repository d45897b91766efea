"""Bad input to `ddeseg evaluate` and `ddeseg predict` (issue 14): each case exits with the
documented status, says what was wrong on one line naming the file, and changes nothing the user
did not ask for. Numbers that look valid but are not are refused or marked.

| case                                        | status | what stays                          |
|---------------------------------------------|--------|-------------------------------------|
| checkpoint of another architecture / part   | 2      | no --out folder                     |
| a shard cut in half                         | 3      | eval.json with "partial": true      |
| memory bank: class count, (k = 0), int32    | 2      | no --out folder                     |
| --out is an existing file                   | 2      | the file, byte for byte             |
| predict -f above the video's frame rate     | 0      | one frame written per video frame   |
| predict where every video fails             | 1      | no --out folder (nor its parents)   |
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_bad_checkpoints import invoke
from test_evaluate import NAMES, save_our_checkpoint, tiny_config, tiny_model, write_tiny_shards
from typer.testing import CliRunner

import ddeseg.progress
from ddeseg.cli.app import app
from ddeseg.config import save_config
from ddeseg.data import schema

EMBED_DIM = 64  # tiny_config's model.audio_embed_dim


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints (ours v2 and v1s; another head width; an official one without the head), the
    tiny v2 config as YAML, and memory banks good and bad."""
    root = tmp_path_factory.mktemp("inputs")
    config = tiny_config("v2")
    model = tiny_model(config)
    out = {
        "v2": save_our_checkpoint(model, config, root / "v2.pt"),
        "v1s": save_our_checkpoint(tiny_model(tiny_config("v1s")), tiny_config("v1s"), root / "v1s.pt"),
        "config": root / "tiny-v2.yaml",
    }
    save_config(config, out["config"])
    wider = tiny_config("v2")
    wider.model.head_embedding_dim = 32  # another size of the same architecture: most tensors still fit
    out["wider"] = save_our_checkpoint(tiny_model(wider), wider, root / "wider.pt")
    headless = {k: v for k, v in model.state_dict().items() if not k.startswith("decode_head.") and k != "memory_bank"}
    out["headless"] = root / "headless.pth"
    torch.save({"model": headless}, out["headless"])
    rng = np.random.default_rng(0)
    banks = {
        "bank": rng.standard_normal((len(NAMES), 3, EMBED_DIM)).astype(np.float32),
        "bank-5-classes": rng.standard_normal((len(NAMES) + 1, 3, EMBED_DIM)).astype(np.float32),
        "bank-k0": np.zeros((len(NAMES), 0, EMBED_DIM), np.float32),
        "bank-int32": rng.integers(0, 9, (len(NAMES), 3, EMBED_DIM)).astype(np.int32),
    }
    for name, bank in banks.items():
        out[name] = root / f"{name}.npy"
        np.save(out[name], bank)
    return out


def evaluate(*args: str) -> tuple[int, str]:
    return invoke("evaluate", *args, "--pictures", "0", "--worst", "0", "--device", "cpu")


# --------------------------------------------------------------------------------------------
# A checkpoint that does not fill the model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoint", "extra", "says"),
    [
        ("wider", [], "shape-mismatched"),  # its stored config is ignored: --config decides the model
        ("headless", ["--memory-bank", "bank"], "missing"),
    ],
)
def test_a_checkpoint_that_does_not_fill_the_model_is_refused(checkpoint, extra, says, files, shards, tmp_path):
    out = tmp_path / "eval"
    extra = [str(files[arg]) if arg in files else arg for arg in extra]
    code, message = evaluate("--checkpoint", str(files[checkpoint]), "--config", str(files["config"]),
                             "--shards", str(shards), "--out", str(out), *extra)
    assert code == 2, message
    assert message.startswith(f"error: {files[checkpoint]} does not fit the model of {files['config']}"), message
    assert says in message and "\n" not in message
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# A split not scored whole
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cut_shards(shards, tmp_path) -> tuple[Path, str]:
    """A copy of the shards whose first v2 shard (vidA, frames 0-3, all annotated) is cut in the
    middle of frame 2's image: frames 0 and 1 are whole, 2 and 3 are lost. Returns (root, shard)."""
    root = shutil.copytree(shards, tmp_path / "cut")
    shard = Path("v2") / "test" / schema.SHARD_NAME.format(index=0)
    with tarfile.open(root / shard) as archive:
        member = archive.getmember(f"{schema.sample_key('v2', 'vidA', 2)}.image.png")
    data = (root / shard).read_bytes()
    (root / shard).write_bytes(data[: member.offset_data + member.size // 2])
    return root, str(shard)


def test_a_split_not_scored_whole_is_marked_partial_and_exits_3(cut_shards, files, tmp_path, monkeypatch):
    root, shard = cut_shards
    bars = []

    def recording_progress(*args, **kwargs):
        bars.append(progress(*args, **kwargs))
        return bars[-1]

    progress = ddeseg.progress.stage_progress
    monkeypatch.setattr(ddeseg.progress, "stage_progress", recording_progress)
    code, output = evaluate("--checkpoint", str(files["v2"]), "--shards", str(root), "--out", str(tmp_path / "a"))
    assert code == 3, output
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    # v2 has 6 annotated frames (vidA 4, vidB 2); vidA's frames 2 and 3 are lost.
    assert report["partial"] is True
    assert report["counts"]["frames_not_scored"] == 2 and report["counts"]["frames"] == 4
    assert report["counts"]["frames_in_manifest"] == 6
    assert report["skipped_shards"] == [shard]
    assert "2 of 6 frames" in output and "--allow-partial" in output
    (bar,) = bars
    assert (bar.tasks[0].completed, bar.tasks[0].total) == (4, 6)  # the bar does not claim 6/6

    code, output = evaluate("--checkpoint", str(files["v2"]), "--shards", str(root), "--out", str(tmp_path / "b"),
                            "--allow-partial")
    assert code == 0, output
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["partial"] is True


def test_a_whole_split_is_not_partial(shards, files, tmp_path):
    code, output = evaluate("--checkpoint", str(files["v2"]), "--shards", str(shards), "--out", str(tmp_path / "e"))
    assert code == 0, output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["partial"] is False and report["counts"]["frames_not_scored"] == 0 and "skipped_shards" not in report


# --------------------------------------------------------------------------------------------
# Memory banks that do not fit, --out that is a file
# --------------------------------------------------------------------------------------------

BAD_BANKS = [
    ("v2", "bank-5-classes", "memory bank has 5 classes, but task v2 needs 4"),
    ("v1s", "bank-5-classes", "memory bank has 5 classes, but task v1s of"),  # binary: the shards' bank rows
    ("v2", "bank-k0", "memory bank has shape (4, 0, 64)"),
    ("v2", "bank-int32", "memory bank has dtype int32"),
]


@pytest.mark.parametrize(("checkpoint", "bank", "says"), BAD_BANKS)
def test_evaluate_refuses_a_memory_bank_that_does_not_fit(checkpoint, bank, says, files, shards, tmp_path):
    out = tmp_path / "eval"
    code, message = evaluate("--checkpoint", str(files[checkpoint]), "--shards", str(shards), "--task", checkpoint,
                             "--memory-bank", str(files[bank]), "--out", str(out))
    assert code == 2 and message.startswith(f"error: {files[bank]}: ") and says in message, message
    assert not out.exists()


@pytest.mark.parametrize(("checkpoint", "bank", "says"), [case for case in BAD_BANKS if case[0] == "v2"])
def test_predict_refuses_a_memory_bank_that_does_not_fit(checkpoint, bank, says, files, tmp_path):
    out = tmp_path / "pred"
    code, message = invoke("predict", "--checkpoint", str(files[checkpoint]), str(tmp_path / "clip.mp4"),
                           "--memory-bank", str(files[bank]), "--out", str(out), "--device", "cpu", "--quiet")
    assert code == 2 and message.startswith(f"error: {files[bank]}: ") and says in message, message
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(files, shards, tmp_path):
    taken = tmp_path / "results.txt"
    taken.write_text("my notes\n")
    before = digest(taken)
    for command in (
        ["evaluate", "--checkpoint", str(files["v2"]), "--shards", str(shards)],
        ["predict", "--checkpoint", str(files["v2"]), str(tmp_path / "clip.mp4"), "--quiet"],
    ):
        code, message = invoke(*command, "--out", str(taken))
        assert code == 2 and message == f"error: --out {taken} is an existing file, not a folder: choose another --out"
        assert digest(taken) == before


# --------------------------------------------------------------------------------------------
# predict: a rate above the video's, a run where every video fails
# --------------------------------------------------------------------------------------------


def write_clip(path: Path, frames: int, rate: int) -> Path:
    """`frames` distinct frames at `rate` frames/s (48 x 40 px) with AAC audio of the same length."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 48, 40, "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono")
        for index in range(frames):
            image = np.full((40, 48, 3), 20 * index % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = 16000 * frames // rate
        wave = (rng.standard_normal((1, samples)) * 3000).astype(np.int16)
        chunk = av.AudioFrame.from_ndarray(wave, format="s16", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))
    return path


def test_predict_caps_the_rate_at_the_videos_frame_rate(files, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", frames=10, rate=10)
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(files["v2"]), str(clip), "--out", str(out),
                                      "-f", "1000", "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warning == [f"warning: {clip}: --frames-per-second 1000 is above the video's 10 frames/s; sampling 10"
                       " frames/s (every frame once)"]
    document = json.loads((out / "clip" / "predictions.json").read_text())
    assert (document["frames_per_second"], document["frames_per_second_requested"]) == (10, 1000)
    assert len(document["frames"]) == 10 and len(list((out / "clip" / "masks").glob("*.png"))) == 10
    assert [frame["time_s"] for frame in document["frames"]] == [k / 10 for k in range(10)]


def test_a_predict_run_where_every_video_fails_leaves_no_folder(files, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    out = tmp_path / "new" / "pred"
    code, output = invoke("predict", "--checkpoint", str(files["v2"]), str(text), str(tmp_path / "missing.mp4"),
                          "--out", str(out), "--device", "cpu", "--quiet")
    assert code == 1, output
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
