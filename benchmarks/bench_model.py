"""DDESeg forward+backward speed and peak memory on the CPU, fused vs explicit attention.

    .venv/bin/python benchmarks/bench_model.py [--steps 2] [--threads 1] [--configs tiny,mid]

For each configuration and attention path, a fresh subprocess builds the model (train mode,
frozen audio backbone, random memory bank) and times `forward + backward` of one batch per step
(median over `--steps` after one warm-up step). Memory: the process's resident set after building
the model (`built`) and its peak over the whole run (`peak`, includes the Python/torch runtime,
the model, and the training step's activations and gradients). The ratio
column is explicit time / fused time, measured in the same run. Before timing, the fused path is
checked against the official fixture (`../shared/reference/tiny_forward.npz`).

Configurations:
- `tiny`: configs/tiny.yaml (the fixture's model), 64x64 images, batch 2.
- `mid`: the paper's audio backbone (HTS-AT 2,2,6,2) and a MiT-B1-sized visual backbone
  (widths of B5, depths 2,2,2,2), head embedding 256, 224x224 images, batch 2.
Runs in well under 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"

CONFIGS = {
    "tiny": {"yaml": "tiny.yaml", "overrides": [], "image_size": 64, "batch": 2},
    "mid": {
        "yaml": "v2.yaml",
        "overrides": ["model.head_embedding_dim=256", "model.visual.depths=[2,2,2,2]"],
        "image_size": 224,
        "batch": 2,
    },
}


def _model_config(name: str):
    from ddeseg.config import load_config

    spec = CONFIGS[name]
    return load_config(ROOT / "configs" / spec["yaml"], spec["overrides"]).model


def _check_fixture() -> float:
    """Max |ours - official| over the fixture arrays, fused path; raises when out of tolerance."""
    import numpy as np
    import torch

    from ddeseg.models import build_model
    from ddeseg.models.reference import ATOL, RTOL, fill_reference_weights

    fixture = np.load(REFERENCE / "tiny_forward.npz")
    model = build_model(_model_config("tiny"))
    fill_reference_weights(model)
    model.set_memory_bank(np.load(REFERENCE / "tiny_bank.npy"))
    model.set_fused_attn(True)
    with torch.no_grad():
        out = model.forward_intermediates(torch.from_numpy(fixture["image"]), torch.from_numpy(fixture["waveform"]))
    arrays = {k: out[k] for k in ("audio_latent", "enhanced_stage1", "enhanced_tokens", "logits")}
    arrays.update({f"stage{i}_features": f for i, f in enumerate(out["stage_features"])})
    worst = 0.0
    for key, tensor in arrays.items():
        np.testing.assert_allclose(tensor.numpy(), fixture[key], atol=ATOL, rtol=RTOL, err_msg=key)
        worst = max(worst, float(np.abs(tensor.numpy() - fixture[key]).max()))
    return worst


def _measure(name: str, fused: bool, steps: int, threads: int, queue) -> None:
    import numpy as np
    import torch

    from ddeseg.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = CONFIGS[name]
    model = build_model(_model_config(name))
    model.set_fused_attn(fused)
    model.set_memory_bank(np.random.default_rng(0).standard_normal((8, 4, 768)).astype(np.float32))
    model.train()
    image = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"])
    waveform = torch.randn(spec["batch"], 22050)
    built_mib = _current_rss_mib()
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        model(image, waveform).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    queue.put({"seconds": statistics.median(times), "built_mib": built_mib, "peak_mib": peak_mib, "params": params})


def _current_rss_mib() -> float:
    """Resident set size now (Linux `/proc/self/statm`), MiB."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_isolated(name: str, fused: bool, steps: int, threads: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(name, fused, steps, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--configs", default="tiny,mid", help=f"comma-separated subset of {sorted(CONFIGS)}")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")

    print(f"fixture check (fused attention): max |ours - official| = {_check_fixture():.2e} (tolerance 1e-4)")
    print(f"forward+backward per step, CPU, {args.threads} thread(s), median of {args.steps}")
    header = (
        f"{'config':6} {'params':>8} {'explicit s':>11} {'fused s':>8} {'ratio':>6} "
        f"{'built MiB':>10} {'peak MiB expl':>14} {'peak MiB fused':>15}"
    )
    print(header)
    rows = []
    for name in names:
        explicit = _run_isolated(name, False, args.steps, args.threads)
        fused = _run_isolated(name, True, args.steps, args.threads)
        ratio = explicit["seconds"] / fused["seconds"]
        rows.append({"config": name, "explicit": explicit, "fused": fused, "ratio": ratio})
        print(
            f"{name:6} {explicit['params'] / 1e6:7.1f}M {explicit['seconds']:11.3f} {fused['seconds']:8.3f} "
            f"{ratio:6.2f} {explicit['built_mib']:10.0f} {explicit['peak_mib']:14.0f} {fused['peak_mib']:15.0f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
