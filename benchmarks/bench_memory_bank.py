"""FAISS K-Means (our memory bank) against scikit-learn KMeans on the same embeddings.

Two comparisons per class, both with the same k, at most `--niter` Lloyd iterations and one
init (`n_init=1`, `nredo=1`):

* `same_init`: both start from the same k points of the class (chosen with `--seed`). This
  isolates the engine: time, and the inertia reached.
* `own_init`: each library's own random init (FAISS: k random points drawn with its seed, through
  the stage's `cluster_class_embeddings`, which also computes each class's inertia;
  scikit-learn: `init="random"`).

Both stop before `--niter` at a fixed point (FAISS: objective unchanged; scikit-learn with
`tol=0`: labels unchanged); the mean iterations and the time per iteration are reported.
Inertia is recomputed for both from the final centroids by the same float64 function. FAISS
passes when its inertia is at most 1% above scikit-learn's (summed over classes; the worst class
is shown too). Times are wall-clock, both libraries on every CPU thread of this machine (or
`--threads`; reported), after one warm-up run each, best of `--repeats` runs of each phase (on a
shared machine the best run is the least disturbed). On a CPU shared with other jobs, use
`--threads 1`: FAISS's OpenMP workers wait for each other at every iteration, and a worker that
another job pushes off its core stalls them all (2-8x slower timings, both libraries).

Sizes: `synthetic` (8 classes x 240 points x 768 dims, k 16: a tiny synthetic set) and
`avss` (71 classes x 2000 points x 768 dims, k 128: AVSS-like). Embeddings are synthetic and
clustered (`clustered_embeddings`). The AVSS-like run clusters `--avss-classes` of the 71
classes (default 12, to stay within a few minutes on 2 cores) and extrapolates the times to 71
classes linearly (every class has the same size, so the same expected time); the inertia ratio
is over the classes run. `--avss-classes 71` runs them all.

    .venv/bin/python benchmarks/bench_memory_bank.py [--avss-classes 71] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import sklearn
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits

from ddeseg.pipelines.build_memory_bank import cluster_class_embeddings, kmeans_faiss

AVSS_CLASSES = 71


@dataclass
class Size:
    name: str
    classes: int  # classes actually clustered
    total_classes: int  # classes the size stands for (times are extrapolated to it)
    points: int
    dim: int
    k: int


def clustered_embeddings(size: Size, seed: int) -> dict[int, np.ndarray]:
    """Per class: a centre, 128 sub-modes of unequal weight around it, isotropic noise around
    each mode (overlapping enough that Lloyd needs tens of iterations at k 128, as on real
    embeddings, instead of converging in 4 on well-separated blobs)."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for class_id in range(1, size.classes + 1):
        centre = rng.normal(0.0, 1.0, size.dim)
        modes = centre + rng.normal(0.0, 0.3, (128, size.dim))
        weights = rng.dirichlet(np.ones(len(modes)))
        which = rng.choice(len(modes), size.points, p=weights)
        by_class[class_id] = (modes[which] + rng.normal(0.0, 0.6, (size.points, size.dim))).astype(np.float32)
    return by_class


def inertia(points: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over points of the squared L2 distance to the nearest centroid, all in float64 (the
    one judge of both libraries)."""
    points64, centroids64 = points.astype(np.float64), centroids.astype(np.float64)
    distances = (points64**2).sum(1, keepdims=True) - 2.0 * points64 @ centroids64.T + (centroids64**2).sum(1)
    return float(np.maximum(distances.min(1), 0.0).sum())


def sklearn_kmeans(points: np.ndarray, k: int, niter: int, init, seed: int) -> tuple[np.ndarray, int]:
    model = KMeans(
        n_clusters=k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed
    )
    model.fit(points)
    return model.cluster_centers_.astype(np.float32), int(model.n_iter_)


def warm_up(dim: int) -> None:
    points = np.random.default_rng(0).normal(size=(512, dim)).astype(np.float32)
    kmeans_faiss(points, 8, niter=2)
    sklearn_kmeans(points, 8, 2, "random", 0)


def timed(function, repeats: int):
    """(best wall time of `repeats` runs, the last run's result)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def run_size(size: Size, niter: int, seed: int, repeats: int) -> dict:
    """Both comparisons at one size. Each library's phase runs all classes back to back (never
    interleaved: one library's idle worker threads would slow the other's start)."""
    by_class = clustered_embeddings(size, seed)
    rng = np.random.default_rng(seed + 1)
    inits = {c: points[rng.choice(len(points), size.k, replace=False)] for c, points in by_class.items()}
    result = {
        "size": size.name,
        "classes_run": size.classes,
        "classes_total": size.total_classes,
        "points": size.points,
        "dim": size.dim,
        "k": size.k,
        "niter": niter,
    }

    def faiss_same_init():
        return {
            c: kmeans_faiss(points, size.k, niter=niter, init_centroids=inits[c])
            for c, points in by_class.items()
        }

    def sklearn_run(init):
        return {
            c: sklearn_kmeans(points, size.k, niter, inits[c] if init == "same" else "random", seed + c)
            for c, points in by_class.items()
        }

    def faiss_own_init():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cluster_class_embeddings(by_class, size.k, niter=niter, seed=seed)

    faiss_s, faiss_out = timed(faiss_same_init, repeats)
    sklearn_s, sklearn_out = timed(lambda: sklearn_run("same"), repeats)
    result["same_init"] = summarise(
        size, by_class, faiss_s, sklearn_s,
        {c: out[0] for c, out in faiss_out.items()}, {c: out[1] for c, out in faiss_out.items()},
        {c: out[0] for c, out in sklearn_out.items()}, {c: out[1] for c, out in sklearn_out.items()},
    )  # fmt: skip

    faiss_s, (bank, stats) = timed(faiss_own_init, repeats)
    sklearn_s, sklearn_out = timed(lambda: sklearn_run("random"), repeats)
    result["own_init"] = summarise(
        size, by_class, faiss_s, sklearn_s,
        {entry.class_id: bank[entry.row] for entry in stats}, {entry.class_id: entry.iterations for entry in stats},
        {c: out[0] for c, out in sklearn_out.items()}, {c: out[1] for c, out in sklearn_out.items()},
    )  # fmt: skip
    return result


def summarise(
    size: Size, by_class, faiss_s, sklearn_s, faiss_centroids, faiss_iters, sklearn_centroids, sklearn_iters
):
    scale = size.total_classes / size.classes
    ours = {c: inertia(points, faiss_centroids[c]) for c, points in by_class.items()}
    theirs = {c: inertia(points, sklearn_centroids[c]) for c, points in by_class.items()}
    ratio = sum(ours.values()) / sum(theirs.values())
    faiss_iterations, sklearn_iterations = sum(faiss_iters.values()), sum(sklearn_iters.values())
    return {
        "faiss_s": round(faiss_s * scale, 3),
        "sklearn_s": round(sklearn_s * scale, 3),
        "extrapolated": scale != 1.0,
        "speedup_sklearn_over_faiss": round(sklearn_s / faiss_s, 2),
        "faiss_ms_per_iteration": round(1000 * faiss_s / faiss_iterations, 3),
        "sklearn_ms_per_iteration": round(1000 * sklearn_s / sklearn_iterations, 3),
        "faiss_mean_iterations": round(faiss_iterations / len(by_class), 1),
        "sklearn_mean_iterations": round(sklearn_iterations / len(by_class), 1),
        "faiss_inertia": sum(ours.values()),
        "sklearn_inertia": sum(theirs.values()),
        "inertia_ratio": round(ratio, 5),
        "worst_class_inertia_ratio": round(max(ours[c] / theirs[c] for c in by_class), 5),
        "faiss_within_1pct": ratio <= 1.01,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avss-classes", type=int, default=12, help="classes of the AVSS-like run (of 71)")
    parser.add_argument("--niter", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each phase (the best is kept)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of both libraries (default: all)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    sizes = [
        Size("synthetic", 8, 8, 240, 768, 16),
        Size("avss", min(args.avss_classes, AVSS_CLASSES), AVSS_CLASSES, 2000, 768, 128),
    ]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    environment = {
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_gpus": faiss.get_num_gpus(),
        "sklearn": sklearn.__version__,
        "sklearn_threadpools": [
            (p["user_api"], p["internal_api"], p["num_threads"]) for p in threadpool_info()
        ],
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(environment))
    warm_up(768)
    results = []
    for size in sizes:
        with threadpool_limits(limits=args.threads):
            result = run_size(size, args.niter, args.seed, args.repeats)
        results.append(result)
        print(json.dumps(result))
    print()
    header = (
        f"{'size':<10} {'init':<9} {'faiss s':>8} {'sklearn s':>9} {'speedup':>8} {'ms/it F':>8} {'ms/it S':>8} "
        f"{'it F':>5} {'it S':>5} {'faiss inertia':>14} {'sklearn inertia':>15} {'ratio':>7} {'worst':>7}  verdict"
    )
    print(header)
    for result in results:
        for init in ("same_init", "own_init"):
            row = result[init]
            note = " (times extrapolated)" if row["extrapolated"] else ""
            print(
                f"{result['size']:<10} {init:<9} {row['faiss_s']:>8.2f} {row['sklearn_s']:>9.2f} "
                f"{row['speedup_sklearn_over_faiss']:>7.2f}x {row['faiss_ms_per_iteration']:>8.2f} "
                f"{row['sklearn_ms_per_iteration']:>8.2f} {row['faiss_mean_iterations']:>5.1f} "
                f"{row['sklearn_mean_iterations']:>5.1f} {row['faiss_inertia']:>14.6g} {row['sklearn_inertia']:>15.6g} "
                f"{row['inertia_ratio']:>7.4f} {row['worst_class_inertia_ratio']:>7.4f}  "
                f"{'PASS' if row['faiss_within_1pct'] else 'FAIL'}{note}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
