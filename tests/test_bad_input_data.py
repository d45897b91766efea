"""Bad input on the data side (issue 14): nothing lost, nothing silent.

Each case asserts the exit status, a one-line message naming the file or option, and, where
data could be lost, the hashes of every file outside the request before and after:

- a second `prepare` into a folder adds its tasks (the others' shards, rows and rejects stay)
  or refuses before writing anything when the kept shards would not fit; `--overwrite` replaces;
- a csv row that is not UTF-8 is one reject (`file.csv:LINE`), in every csv of the three layouts;
- DDESeg VPO uids in the `{id}`, `{type}/{id}` and absolute forms resolve under the root (never
  outside it) and prepare says how many of each it met;
- `--out` naming a file, bad `--set` values, a failed run leaving no empty folder;
- `.pkl` files are never read by prepare (garbage bytes give the same shards);
- the demo's plan gives every class training samples at the smallest budget it accepts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ddeseg.cli.app import _one_line, app
from ddeseg.errors import DDESegError
from ddeseg.pipelines.synth import generate

TINY = {"classes": 3, "seed": 7, "image_size": 32}
SMALL_SHARDS = ["--set", "data.samples_per_shard=8"]


def cli(*args: str) -> tuple[int, str]:
    """Run `ddeseg ARGS` in this process as `ddeseg.cli.app.main` does: (exit status, message)."""
    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, DDESegError):
        return 2, _one_line(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def prepare_cli(layout: str, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    return cli("prepare", "--layout", layout, "--root", str(root), "--out", str(out), "--quiet",
               "--device", "cpu", *SMALL_SHARDS, *extra)


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (prepare.json holds times: left out)."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "prepare.json"
    }


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def assert_one_line(message: str, *names: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for name in names:
        assert name in message, (name, message)


@pytest.fixture(scope="module")
def raws(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("raw")
    return {
        "avsbench": generate("avsbench", base / "avsbench", videos=6, **TINY),
        "ddeseg": generate("ddeseg", base / "ddeseg", videos=12, **TINY),
        "vpo": generate("vpo", base / "vpo", videos=6, **TINY),
    }


@pytest.fixture(scope="module")
def avs_all(raws, tmp_path_factory) -> Path:
    """The avsbench layout prepared with every task (v1s, v1m, v2), once."""
    out = tmp_path_factory.mktemp("shards") / "all"
    assert prepare_cli("avsbench", raws["avsbench"], out)[0] == 0
    return out


# --------------------------------------------------------------------------------------------
# 1. A second prepare adds or refuses
# --------------------------------------------------------------------------------------------


def test_second_prepare_of_one_task_keeps_the_other_tasks(raws, avs_all, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(avs_all, out)
    before = hashes(out)
    rows_before = manifest(out)
    assert {row["task"] for row in rows_before} == {"v1s", "v1m", "v2"}
    code, output = prepare_cli("avsbench", raws["avsbench"], out, "--tasks", "v1s")
    assert code == 0, output
    # nothing changed at all: v1s was already prepared the same way, v1m and v2 were kept
    assert hashes(out) == before
    assert manifest(out) == rows_before
    assert "kept from an earlier run" in output and "v1m" in output and "v2" in output
    report = json.loads((out / "prepare.json").read_text())
    assert report["prepared_tasks"] == ["v1s"] and report["tasks"] == ["v1s", "v1m", "v2"]
    assert report["kept_tasks"] == {
        task: sum(row["task"] == task for row in rows_before) for task in ("v1m", "v2")
    }


def test_prepare_into_a_folder_of_other_tasks_adds_to_it(raws, avs_all, tmp_path):
    """v1s alone first, then v1m,v2 into the same folder: the union is byte-identical to one
    run over all three tasks, and the v1s files are untouched by the second run."""
    out = tmp_path / "shards"
    assert prepare_cli("avsbench", raws["avsbench"], out, "--tasks", "v1s")[0] == 0
    v1s_files = hashes(out)
    v1s_files = {k: v for k, v in v1s_files.items() if k.startswith(("v1s/", ".prepare/v1s/"))}
    assert v1s_files
    assert prepare_cli("avsbench", raws["avsbench"], out, "--tasks", "v1m,v2")[0] == 0
    after = hashes(out)
    assert {k: after[k] for k in v1s_files} == v1s_files
    whole = hashes(avs_all)
    for name in ("manifest.parquet", "classes.json", "rejects.jsonl"):
        assert after[name] == whole[name], name
    assert {k for k in after if k.endswith(".tar")} == {k for k in whole if k.endswith(".tar")}


def test_avsbench_into_vpo_shards_adds_when_the_class_lists_agree(raws, tmp_path):
    """The ddeseg VPO part without a label2idx.json uses the built-in 71 AVSS names, which is
    what the avsbench root's label2idx.json lists: the VPO shards stay, AVSS tasks are added."""
    vpo_root = tmp_path / "ddeseg"
    shutil.copytree(raws["ddeseg"], vpo_root)
    (vpo_root / "AVSSData" / "label2idx.json").unlink()
    out = tmp_path / "shards"
    assert prepare_cli("ddeseg", vpo_root, out, "--tasks", "VPO-SS,VPO-MS")[0] == 0
    vpo_files = hashes(out)
    vpo_rows = manifest(out)
    code, output = prepare_cli("avsbench", raws["avsbench"], out)
    assert code == 0, output
    after = hashes(out)
    assert all(after[name] == digest for name, digest in vpo_files.items() if name.startswith(("VPO-", ".prepare/VPO-")))
    rows = manifest(out)
    assert [row for row in rows if row["task"].startswith("VPO")] == vpo_rows
    assert {row["task"] for row in rows} == {"VPO-SS", "VPO-MS", "v1s", "v1m", "v2"}
    classes = json.loads((out / "classes.json").read_text())
    assert set(classes["tasks"]) == {"v1s", "v1m", "v2", "VPO-SS", "VPO-MS"}
    assert len(classes["names"]) == 71 + 9 and classes["names"][1] == "accordion"


def test_prepare_refuses_shards_of_another_class_list_and_overwrite_replaces(raws, tmp_path):
    """ddeseg's synthetic label2idx.json names other classes than the avsbench root's real list:
    adding would give two meanings to one id. Refused, nothing changed; --overwrite replaces."""
    out = tmp_path / "shards"
    assert prepare_cli("ddeseg", raws["ddeseg"], out, "--tasks", "VPO-SS")[0] == 0
    before = hashes(out)
    code, message = prepare_cli("avsbench", raws["avsbench"], out)
    assert code == 2
    assert_one_line(message, str(out / "classes.json"), "VPO-SS", "--overwrite")
    assert hashes(out) == before
    code, _ = prepare_cli("avsbench", raws["avsbench"], out, "--overwrite")
    assert code == 0
    assert {row["task"] for row in manifest(out)} == {"v1s", "v1m", "v2"}
    assert not (out / "VPO-SS").exists()


def test_prepare_refuses_kept_shards_of_another_front_end(raws, avs_all, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(avs_all, out)
    before = hashes(out)
    code, message = prepare_cli("avsbench", raws["avsbench"], out, "--tasks", "v2", "--set", "data.clip_seconds=2")
    assert code == 2
    assert_one_line(message, str(out / "prepare.json"), "data.clip_seconds", "v1s, v1m")
    assert hashes(out) == before


def test_prepare_refuses_an_unreadable_earlier_manifest(raws, avs_all, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(avs_all, out)
    manifest_path = out / "manifest.parquet"
    manifest_path.write_bytes(manifest_path.read_bytes()[:100])
    before = hashes(out)
    code, message = prepare_cli("avsbench", raws["avsbench"], out, "--tasks", "v1s")
    assert code == 2
    assert_one_line(message, str(manifest_path), "--overwrite")
    assert hashes(out) == before


# --------------------------------------------------------------------------------------------
# 2. A row that is not UTF-8 is one reject, in every csv of the three layouts
# --------------------------------------------------------------------------------------------

LATIN1_CASES = [
    # (layout, csv relative to the raw root, 1-based line to spoil, --tasks, extra options)
    ("avsbench", "metadata.csv", 3, None, ()),
    ("avsbench", "Single-source/s4_meta_data.csv", 2, "v1s", ("--avsbench-part", "object")),
    ("avsbench", "Multi-sources/ms3_meta_data.csv", 2, "v1m", ("--avsbench-part", "object")),
    ("ddeseg", "AVSSData/metadata_w_silent.csv", 4, "v1s,v1m,v2", ()),
    ("ddeseg", "VPO_Clean/vpo_data_clean.csv", 2, "VPO-SS,VPO-MS,VPO-MSMI", ()),
    ("vpo", "VPO/VPO-SS/vpo_ss_data_stereo.csv", 2, "VPO-SS", ()),  # SS: one row, one sample
]


def _spoil_line(path: Path, line: int) -> None:
    """Put a Latin-1 'é' (byte 0xe9, never valid alone in UTF-8) into the first cell of `line`."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b",", b"\xe9,", 1)
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(("layout", "csv_name", "line", "tasks", "extra"), LATIN1_CASES)
def test_a_latin1_row_is_one_reject(raws, tmp_path, layout, csv_name, line, tasks, extra):
    root = tmp_path / "raw"
    shutil.copytree(raws[layout], root)
    task_options = ("--tasks", tasks) if tasks else ()
    code, output = prepare_cli(layout, root, tmp_path / "clean", *task_options, *extra)
    assert code == 0, output
    clean_keys = {row["key"] for row in manifest(tmp_path / "clean")}
    _spoil_line(root / csv_name, line)
    out = tmp_path / "spoiled"
    code, output = prepare_cli(layout, root, out, *task_options, *extra)
    assert code == 0, output
    rejects = [json.loads(text) for text in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["key"]) for r in rejects] == [(f"{csv_name}:{line}", None)]
    assert "not UTF-8" in rejects[0]["reason"] and "0xe9" in rejects[0]["reason"]
    # every other sample is there: only the frames of the one video (image) of that row are not
    lost = clean_keys - {row["key"] for row in manifest(out)}
    assert {row["key"] for row in manifest(out)} <= clean_keys
    assert lost and len({key.rsplit("-", 1)[0] for key in lost}) == 1, lost


def test_an_undecodable_header_is_one_line_naming_the_file(raws, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raws["avsbench"], root)
    _spoil_line(root / "metadata.csv", 1)
    out = tmp_path / "out"
    code, message = prepare_cli("avsbench", root, out)
    assert code == 2
    assert_one_line(message, "metadata.csv:1", "header", "UTF-8")
    assert not out.exists()  # bad input: no output folder left behind


# --------------------------------------------------------------------------------------------
# 3. DDESeg VPO uid forms
# --------------------------------------------------------------------------------------------


def test_vpo_uids_of_every_form_resolve_under_the_root(raws, tmp_path):
    """The synthetic csv has `{type}/{id}` uids; rewrite some as `{id}` and as absolute paths
    of another machine, add a `../` uid and an absolute uid whose tail does not exist."""
    root = tmp_path / "raw"
    shutil.copytree(raws["ddeseg"], root)
    csv_path = root / "VPO_Clean" / "vpo_data_clean.csv"
    lines = csv_path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    assert header.split(",")[:3] == ["uid", "frame", "mask"] and len(rows) >= 4
    uids = [row.split(",", 1)[0] for row in rows]
    assert all(uid.count("/") == 1 for uid in uids)
    rows[0] = uids[0].split("/")[1] + "," + rows[0].split(",", 1)[1]  # {id}
    rows[1] = "/home/authors/datasets/VPO_Clean/" + rows[1]  # absolute, tail {type}/{id}
    rows[2] = "C:\\data\\VPO_Clean\\" + uids[2].replace("/", "\\") + "," + rows[2].split(",", 1)[1]
    rest = rows[3].split(",", 1)[1]
    escape = "../../" + uids[3]
    missing = "/home/authors/datasets/VPO_Clean/VPO-SS/no_such_image"
    csv_path.write_text("\n".join([header, *rows, f"{escape},{rest}", f"{missing},{rest}"]) + "\n")
    out = tmp_path / "shards"
    code, output = prepare_cli("ddeseg", root, out, "--tasks", "VPO-SS,VPO-MS,VPO-MSMI")
    assert code == 0, output
    forms = json.loads((out / "prepare.json").read_text())["source"]["uid_forms"]
    assert forms == {"{id}": 1, "absolute": 2, "{type}/{id}": len(rows) - 3}
    assert "VPO uids resolved: 1 {id}, " in " ".join(output.split())
    rejects = [json.loads(text) for text in (out / "rejects.jsonl").read_text().splitlines()]
    n = len(rows) + 1
    assert [r["path"] for r in rejects] == [f"VPO_Clean/vpo_data_clean.csv:{n + 1}", f"VPO_Clean/vpo_data_clean.csv:{n + 2}"]
    assert "'..'" in rejects[0]["reason"]
    assert "no video folder" in rejects[1]["reason"] and "VPO_Clean/VPO-SS/no_such_image" in rejects[1]["reason"]
    # every listed image is prepared once, under its id, read from inside the root
    assert len(manifest(out)) == len(rows)
    for row in manifest(out):
        assert row["source_image"].startswith("VPO_Clean/VPO-") and ".." not in row["source_image"]
        assert not row["video"].startswith(("/", "VPO"))


def test_uid_candidates_never_leave_the_vpo_folder():
    from ddeseg.pipelines.sources.ddeseg_layout import uid_candidates

    assert uid_candidates("000001", "VPO-SS") == ("{id}", ["VPO-SS/000001", "000001"])
    assert uid_candidates("VPO-MS/000001", "VPO-MS") == ("{type}/{id}", ["VPO-MS/000001"])
    assert uid_candidates("/mnt/a/b/VPO_Clean/VPO-MS/000001", "VPO-MS") == (
        "absolute", ["VPO-MS/000001", "000001"])
    assert uid_candidates("D:\\x\\VPO-SS\\7", "VPO-SS") == ("absolute", ["VPO-SS/7", "7"])
    for form, candidates in (uid_candidates("/a/b", "VPO-SS"), uid_candidates("/b", "VPO-SS")):
        assert form == "absolute" and all(not c.startswith("/") for c in candidates)


# --------------------------------------------------------------------------------------------
# 4./5. What synth writes: string VPO uids, .pkl files prepare never reads
# --------------------------------------------------------------------------------------------


def test_prepare_never_reads_the_log_mel_pickles(raws, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raws["avsbench"], root)
    pickles = sorted(root.rglob("*.pkl"))
    assert pickles and all("audio_log_mel" in p.as_posix() for p in pickles)
    reference = tmp_path / "reference"
    assert prepare_cli("avsbench", root, reference, "--avsbench-part", "object")[0] == 0
    for path in pickles:  # garbage that no unpickler accepts
        path.write_bytes(b"\x80\x05garbage, never unpickle" + bytes(range(256)))
    out = tmp_path / "garbage"
    assert prepare_cli("avsbench", root, out, "--avsbench-part", "object")[0] == 0
    assert hashes(out) == hashes(reference)


# --------------------------------------------------------------------------------------------
# 7. --out, --set, failed runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prepare", "synth", "build-memory-bank"])
def test_out_naming_a_file_is_refused_up_front(raws, tmp_path, command):
    target = tmp_path / "a-file"
    target.write_bytes(b"user data")
    args = {
        "prepare": ["prepare", "--layout", "avsbench", "--root", str(raws["avsbench"]), "--quiet"],
        "synth": ["synth", "--layout", "ddeseg", "--quiet"],
        # a shards folder that does not exist: the --out check must come before reading it
        "build-memory-bank": ["build-memory-bank", "--shards", str(tmp_path / "no-shards"), "--quiet"],
    }[command]
    code, message = cli(*args, "--out", str(target))
    assert code == 2
    assert_one_line(message, f"--out {target}", "not a directory")
    assert target.read_bytes() == b"user data"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("data.bogus=1", ("--set data.bogus=1", "config.data", "bogus")),
        ("data.samples_per_shard=0", ("data.samples_per_shard", ">= 1", "got 0")),
    ],
)
def test_bad_set_values_are_one_line_naming_the_key(raws, tmp_path, override, names):
    out = tmp_path / "out"
    code, message = cli("prepare", "--layout", "avsbench", "--root", str(raws["avsbench"]), "--out", str(out),
                        "--quiet", "--set", override)
    assert code == 2
    assert_one_line(message, *names)
    assert not message.startswith("None")
    assert not out.exists()


def test_a_failed_prepare_leaves_no_output_folder(raws, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raws["avsbench"], root)
    # a frame of the first shard prepare writes (shards go in (task, split) order): nothing is
    # written before the failure, so the folder it created must go
    meta = json.loads((root / "synth_meta.json").read_text())
    video = min((v for v in meta["videos"] if v["task"] == "v1m"), key=lambda v: (v["split"], v["video"]))
    first = root / video["frames"][0]["files"]["AVSS"]["image"]
    first.unlink()
    out = tmp_path / "parent" / "out"
    code, message = prepare_cli("avsbench", root, out, "--on-error", "fail", "--tasks", "v1m")
    assert code == 2
    assert_one_line(message, first.relative_to(root).as_posix(), "missing image file")
    assert not out.exists()
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    code, message = prepare_cli("avsbench", empty_root, out)
    assert code == 2 and not out.exists()
    assert_one_line(message, str(empty_root))


# --------------------------------------------------------------------------------------------
# 8. The demo's plan at small budgets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("minutes", "classes"), [(0.1, 8), (0.3, 3)])
def test_small_demo_budgets_give_every_class_a_memory_bank_row(tmp_path, minutes, classes):
    """The smallest budgets `ddeseg demo` accepts: the synthetic set covers every class with
    single-source training frames, so the memory bank (here with a stand-in embedder: the
    mean log-mel) finds every class, as the real pipeline's does."""
    from ddeseg.config import load_config
    from ddeseg.pipelines.build_memory_bank import MemoryBankPaths, build_memory_bank
    from ddeseg.pipelines.demo import DemoPlan, synth_covering_every_class
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.stage import RunOptions

    plan = DemoPlan.for_minutes(minutes, classes=classes)
    plan.image_size = 32  # smaller frames than the demo's: the class draw does not depend on it
    raw = synth_covering_every_class(tmp_path / "raw", plan)
    meta = json.loads((raw / "synth_meta.json").read_text())
    assert len(meta["videos"]) == plan.videos >= 12
    config = load_config("demo", [f"model.num_classes={classes + 1}", "data.samples_per_shard=64", "task=v2", "memory_bank.k=2"])
    prepare(config, PreparePaths(layout="ddeseg", root=raw, out=tmp_path / "shards", tasks=["v2"]), RunOptions(progress=False))

    def embed(logmel):  # [B, frames, mel] -> [B, mel]
        return logmel.float().mean(dim=1)

    result = build_memory_bank(
        config, MemoryBankPaths(tmp_path / "shards", tmp_path / "bank"), RunOptions(device="cpu", progress=False),
        embed_fn=embed, embed_fingerprint="mean-logmel",
    )
    bank = np.load(tmp_path / "bank" / "bank.npy")
    assert bank.shape[0] >= classes + 1 and np.isfinite(bank).all()
    assert result is not None
