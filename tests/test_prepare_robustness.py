"""`ddeseg prepare` under bad inputs, interruption and parallelism: broken files become exactly
their rejects, `--on-error fail` names the file, a SIGKILLed run resumes to the same bytes, and
the output does not depend on `--workers`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddeseg.config import Config
from ddeseg.data.schema import sample_key
from ddeseg.errors import DataError
from ddeseg.pipelines.prepare import PreparePaths, prepare
from ddeseg.pipelines.synth import generate
from ddeseg.stage import RunOptions

CLI = [sys.executable, "-m", "ddeseg", "prepare"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate(
        "avsbench", tmp_path_factory.mktemp("raw") / "avsbench", videos=9, classes=4, seed=5, image_size=40
    )


def small_shards(samples_per_shard: int = 4) -> Config:
    config = Config()
    config.data.samples_per_shard = samples_per_shard
    return config


def run(
    root: Path, out: Path, config: Config | None = None, tasks: list[str] | None = None, overwrite: bool = False, **settings
) -> object:
    """prepare with `settings` as keys of the config's `prepare` section (workers, on_error, ...)."""
    config = config or small_shards()
    for key, value in settings.items():
        setattr(config.prepare, key, value)
    return prepare(
        config,
        PreparePaths(layout="avsbench", root=root, out=out, tasks=tasks),
        RunOptions(progress=False, overwrite=overwrite),
    )


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and the manifest (prepare.json holds times and is left out)."""
    files = sorted(out.glob("*/*/shard-*.tar")) + [
        out / "manifest.parquet",
        out / "classes.json",
        out / "rejects.jsonl",
    ]
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in files}


def all_keys(raw: Path) -> set[str]:
    meta = json.loads((raw / "synth_meta.json").read_text())
    return {sample_key(v["task"], v["video"], f["frame"]) for v in meta["videos"] for f in v["frames"]}


def test_broken_inputs_give_exactly_their_rejects(raw, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(raw, broken)
    meta = json.loads((broken / "synth_meta.json").read_text())
    videos = {task: [v for v in meta["videos"] if v["task"] == task] for task in ("v1s", "v1m", "v2")}
    expected: set[tuple[str, str, str | None]] = set()

    # a truncated JPEG
    v2_a, v2_b = videos["v2"][0], videos["v2"][1]
    jpeg = v2_a["frames"][2]["files"]["AVSS"]["image"]
    data = (broken / jpeg).read_bytes()
    (broken / jpeg).write_bytes(data[: len(data) // 2])
    expected.add((jpeg, "corrupt image", sample_key("v2", v2_a["video"], 2)))
    # a missing wav: every frame of that video
    v1m = videos["v1m"][0]
    wav = v1m["files"]["AVSS"]["audio"]
    (broken / wav).unlink()
    expected |= {(wav, "missing audio file", sample_key("v1m", v1m["video"], f)) for f in range(5)}
    # a mask whose size differs from its frame
    mask = v2_b["frames"][4]["files"]["AVSS"]["mask_rgb"]
    Image.new("RGB", (8, 8)).save(broken / mask)
    expected.add((mask, "mask size 8x8 differs", sample_key("v2", v2_b["video"], 4)))
    # an unknown class colour
    v1s = next(v for v in videos["v1s"] if v["split"] != "train")
    colour_mask = v1s["frames"][1]["files"]["AVSS"]["mask_rgb"]
    pixels = np.asarray(Image.open(broken / colour_mask).convert("RGB")).copy()
    pixels[0, 0] = (1, 2, 3)
    Image.fromarray(pixels).save(broken / colour_mask)
    expected.add((colour_mask, "unknown class colour RGB(1, 2, 3)", sample_key("v1s", v1s["video"], 1)))
    # a duplicate csv row, and a row whose paths leave the root
    lines = (broken / "metadata.csv").read_text().splitlines()
    duplicate = next(i for i, line in enumerate(lines) if f",{videos['v1s'][0]['video']}," in line)
    escaping = "x,../../outside,0,0,a,test,v1s"
    (broken / "metadata.csv").write_text("\n".join(lines + [lines[duplicate], escaping]) + "\n")
    expected.add(
        (
            f"metadata.csv:{len(lines) + 1}",
            f"duplicate row: video {videos['v1s'][0]['video']!r} already listed at line {duplicate + 1}",
            None,
        )
    )
    expected |= {
        (
            f"v1s/../../outside/frames/{f}.jpg",
            "path escapes the dataset root",
            sample_key("v1s", "../../outside", f),
        )
        for f in range(5)
    }

    out = tmp_path / "out"
    result = run(broken, out)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(expected) == len(result.rejects)
    found = {(r["path"], r["key"]) for r in rejects}
    assert found == {(path, key) for path, _, key in expected}
    for reject in rejects:
        reason = next(
            reason for path, reason, key in expected if (path, key) == (reject["path"], reject["key"])
        )
        assert reject["reason"].startswith(reason), reject
    rejected_keys = {key for _, _, key in expected if key}
    manifest_keys = set(pq.read_table(out / "manifest.parquet", columns=["key"]).column("key").to_pylist())
    assert manifest_keys == all_keys(raw) - rejected_keys  # everything else is there
    report = json.loads((out / "prepare.json").read_text())
    assert report["rejects"] == len(expected) and report["samples"] == len(manifest_keys)

    # --on-error fail: the first bad input stops the run, with a one-line message naming the file
    failed = subprocess.run(
        CLI
        + [
            "--layout",
            "avsbench",
            "--root",
            str(broken),
            "--out",
            str(tmp_path / "fail"),
            "--on-error",
            "fail",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 2
    message = failed.stderr.strip().splitlines()
    assert (
        len(message) == 1 and message[0].startswith("error: metadata.csv:") and "duplicate row" in message[0]
    )
    with pytest.raises(DataError) as error:
        run(broken, tmp_path / "fail-v2", tasks=["v2"], on_error="fail")
    assert jpeg in str(error.value) or mask in str(error.value)


def test_killed_run_resumes_to_the_same_bytes(raw, tmp_path):
    reference = tmp_path / "reference"
    run(raw, reference, small_shards(1))
    out = tmp_path / "killed"
    process = subprocess.Popen(
        CLI
        + [
            "--layout",
            "avsbench",
            "--root",
            str(raw),
            "--out",
            str(out),
            "--set",
            "data.samples_per_shard=1",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob(".prepare/*/*/shard-*.json"))) < 3:
            assert process.poll() is None, "prepare ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "manifest.parquet").exists()  # killed midway
    finished = sorted(out.glob("*/*/shard-*.tar"))
    assert 3 <= len(finished) < len(list(reference.glob("*/*/shard-*.tar")))
    for shard in finished:  # no half shard: every visible tar is complete
        with tarfile.open(shard) as archive:
            assert len(archive.getmembers()) >= 4
    result = run(raw, out, small_shards(1))
    assert result.shards_kept >= 3
    assert output_bytes(out) == output_bytes(reference)
    assert not list(out.rglob(".*.tmp"))


def test_workers_do_not_change_the_output_and_edits_rebuild_one_shard(raw, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(raw, one, workers=1)
    run(raw, two, workers=2)
    assert output_bytes(one) == output_bytes(two)
    # a second run keeps everything; editing one raw frame rebuilds only its shard
    edited = tmp_path / "edited"
    shutil.copytree(raw, edited)
    first = run(edited, tmp_path / "incremental")
    assert run(edited, tmp_path / "incremental").shards_written == 0
    meta = json.loads((edited / "synth_meta.json").read_text())
    image = edited / meta["videos"][-1]["frames"][0]["files"]["AVSS"]["image"]
    image.write_bytes(image.read_bytes())  # same bytes, new mtime: the fingerprint sees it
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = run(edited, tmp_path / "incremental")
    assert (again.shards_written, again.shards_kept) == (1, first.shards_written - 1)
    overwritten = run(edited, tmp_path / "incremental", overwrite=True)
    assert overwritten.shards_kept == 0
