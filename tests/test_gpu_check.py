"""`benchmarks/gpu_check.py`, the prepared first-GPU check, tested where CI runs: the CPU.

The dry run runs every part at tiny sizes in its own process, as the real run does on a GPU;
the parent's guards (budget, time limit, a failing part) are checked on their own, quickly.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _gpu_check():
    if "gpu_check" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _run(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    out = Path(args[args.index("--out") + 1])
    completed = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                               timeout=timeout)
    return completed, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's 'cpu' table is the CPU's; on a GPU run the real check")
def test_dry_run_runs_every_part_and_prints_cpu_for_gpu_figures(tmp_path):
    started = time.time()
    completed, report = _run("--dry-run", "--out", str(tmp_path / "check.json"), "--budget-s", "600")
    elapsed = time.time() - started
    print(completed.stdout, completed.stderr[-3000:], f"dry run: {elapsed:.0f} s", sep="\n")
    assert completed.returncode == 0
    parts = report["parts"]
    assert list(parts) == [p.name for p in _gpu_check().PARTS]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
    # Each part measured something real (on the CPU): numbers, not placeholders.
    assert parts["environment"]["cuda_available"] is False and parts["environment"]["faiss_gpus"] == 0
    variants = parts["train_steps"]["variants"]
    assert [(v["precision"], bool(v["checkpointing"])) for v in variants] == [("fp32", False), ("bf16", False), ("bf16", True)]
    for variant in variants:
        assert variant["status"] == "ok" and variant["step_s"] > 0 and variant["micro_batch"] == 2
        assert variant["planned_peak"] > variant["planned_transient"] > 0
        assert variant["max_memory_allocated"] is None  # no CUDA allocator to ask
    tests = parts["cuda_tests"]
    collected = sum(1 for line in (REPO / "tests" / "test_cuda.py").read_text().splitlines() if line.startswith("def test_"))
    assert tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= collected
    assert any("needs CUDA" in reason for reason in tests["skip_reasons"])
    assert parts["faiss"]["cpu"]["inertia"] > 0 and "no GPU" in parts["faiss"]["gpu"]
    assert parts["loader"]["alone"]["steady_samples_per_s"] > 0
    assert 0 <= parts["loader"]["fed"]["waiting_fraction"] <= 1 and parts["loader"]["fed"]["steps"] > 0
    assert parts["predict"]["frames"] > 0 and parts["predict"]["frames_per_s"] > 0
    assert parts["compile"]["speedup"] > 0 and parts["compile"]["backend"] == "eager"
    # The table: every part, GPU figures as "cpu", CPU facts as measured.
    table = completed.stdout
    for name in parts:
        assert f"| **{name}** | status | ok" in table
    assert "| | GPU | cpu |" in table and "| | step fp32, micro-batch 2 | cpu |" in table
    assert "| | FAISS K-Means GPU | cpu |" in table
    assert re.search(r"\| \| FAISS K-Means CPU \(2000 x 768, k 16\) \| [0-9.]+ s, \d+ iterations \|", table)


def test_a_part_that_does_not_fit_the_budget_is_skipped(tmp_path):
    completed, report = _run("--dry-run", "--out", str(tmp_path / "check.json"), "--budget-s", "5", timeout=60)
    assert completed.returncode == 0
    assert all(part["status"].startswith("skipped: ") and "needs" in part["status"] for part in report["parts"].values())
    assert "| **compile** | status | skipped: " in completed.stdout


def test_a_failing_or_hanging_part_keeps_the_others(tmp_path):
    gpu_check = _gpu_check()
    args = gpu_check.argparse.Namespace(dry_run=True)
    work, report = tmp_path / "work", tmp_path / "report.json"
    report.write_text(json.dumps({"parts": {}}))
    # A part the child does not know: it fails, and its log's tail says why.
    failed = gpu_check._run_part(gpu_check.Part("no_such_part", "part_no_such_part", 1, 60), args, work, report, 60)
    assert failed["status"].startswith("failed: ") and "no_such_part" in "\n".join(failed["log_tail"])
    # A part that cannot finish in its time limit (importing torch alone takes longer) is
    # killed, with its process group, at the limit.
    started = time.time()
    hung = gpu_check._run_part(gpu_check.Part("environment", "part_environment", 0, 0.3), args, work, report, 60)
    assert hung["status"].startswith("timeout: killed after 0 s") and time.time() - started < 10
    # The table shows both, and a later part that succeeded.
    table = gpu_check.table({"parts": {"no_such_part": failed, "environment": hung,
                                       "faiss": {"status": "ok", "seconds": 1, "rows": [["FAISS K-Means GPU", "1.0 s", True]]}}})
    assert "| **no_such_part** | status | failed: " in table and "| **environment** | status | timeout: " in table
    assert "| | FAISS K-Means GPU | cpu |" in table  # environment did not say CUDA: GPU figures read "cpu"
