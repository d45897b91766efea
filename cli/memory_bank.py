"""`ddeseg build-memory-bank`: parse arguments, build the config, call
`ddeseg.pipelines.memory_bank.build_memory_bank`."""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path

import typer

from ddeseg.cli.app import app


class MissingFill(str, Enum):
    global_mean = "global_mean"
    zeros = "zeros"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from rich.markup import escape

    from ddeseg.progress import console

    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


@app.command("build-memory-bank", no_args_is_help=True)
def build_memory_bank_command(
    shards: Path = typer.Option(..., "--shards", help="Prepared directory (SHARDS_DIR) of `ddeseg prepare`."),
    k: int = typer.Option(128, "--k", min=1, help="Centroids (K-Means clusters) per class."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (BANK_DIR): bank.npy, bank.json, embeddings.parquet."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="Config YAML (model, and task as the default of --task); default: the built-in defaults.",
    ),
    audio_checkpoint: Path | None = typer.Option(
        None,
        "--audio-checkpoint",
        exists=True,
        dir_okay=False,
        help="Weights of the frozen audio backbone (e.g. RUN_DIR/last.pt of `ddeseg pretrain-audio`).",
    ),
    task: str | None = typer.Option(
        None,
        "--task",
        help="Task whose training shards are read (v1s, v1m, v2, VPO-*); default: the config's.",
    ),
    reuse_embeddings: bool = typer.Option(
        False,
        "--reuse-embeddings",
        help="Re-cluster BANK_DIR/embeddings.parquet of an earlier run instead of embedding again.",
    ),
    niter: int = typer.Option(25, "--niter", min=1, help="K-Means iterations."),
    nredo: int = typer.Option(1, "--nredo", min=1, help="K-Means restarts; the best is kept."),
    seed: int = typer.Option(0, "--seed", help="K-Means random seed (same seed, same bank on the CPU)."),
    spherical: bool = typer.Option(
        False, "--spherical", help="Cosine K-Means: normalised embeddings, unit-length centroids."
    ),
    include_multi_source: bool = typer.Option(
        False,
        "--include-multi-source",
        help="Also use samples with several sounding classes, for each of their classes.",
    ),
    silence_row: bool = typer.Option(
        False,
        "--silence-row",
        help="Cluster silent samples into the background row (otherwise it is filled like a missing class).",
    ),
    allow_missing_classes: bool = typer.Option(
        False, "--allow-missing-classes", help="Fill classes without any sample instead of failing."
    ),
    missing_fill: MissingFill = typer.Option(
        MissingFill.global_mean,
        "--missing-fill",
        help="Row of a class without samples: global_mean or zeros.",
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda or cuda:N (embedding and FAISS); default: the GPU when present."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Clips per embedding batch."),
    override: list[str] = typer.Option(
        [], "--set", help="Config override, e.g. --set model.audio.depths=[2,2,6,2] (repeatable)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Training shards -> per-class K-Means audio memory bank (BANK_DIR/bank.npy: classes x k x dim, float32).

    Embeds the log-mel of every annotated training sample with the frozen audio backbone, then clusters each class with FAISS K-Means on all its points. A class with fewer than k samples keeps its points plus copies of its mean (with a warning); see BANK_DIR/bank.json for the counts.

    Examples:

        ddeseg build-memory-bank --shards shards/avs --k 128 --out bank/v2 --config configs/v2.yaml --audio-checkpoint runs/audio/last.pt

        ddeseg build-memory-bank --shards shards/avs --k 64 --out bank/v2 --reuse-embeddings

        ddeseg build-memory-bank --shards shards/vpo --task VPO-MS --k 5 --out bank/vpo --include-multi-source --allow-missing-classes
    """
    from rich.console import Console

    from ddeseg.config import load_config
    from ddeseg.pipelines.memory_bank import build_memory_bank, summary_table

    with warnings.catch_warnings():  # restores the usual warning printer afterwards
        warnings.showwarning = _one_line_warning
        try:
            result = build_memory_bank(
                shards,
                out,
                k,
                config=load_config(config, list(override)),
                audio_checkpoint=audio_checkpoint,
                task=task,
                reuse_embeddings=reuse_embeddings,
                niter=niter,
                nredo=nredo,
                seed=seed,
                spherical=spherical,
                include_multi_source=include_multi_source,
                silence_row=silence_row,
                allow_missing_classes=allow_missing_classes,
                missing_fill=missing_fill.value,
                device=device,
                batch_size=batch_size,
                progress=not quiet,
            )
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    Console().print(summary_table(result))
