"""`ddeseg build-memory-bank`: parse arguments, build the config, call
`ddeseg.pipelines.build_memory_bank.build_memory_bank`."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command

MissingFill = options.config_choices("MissingFill", "memory_bank.missing_fill")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from rich.markup import escape

    from ddeseg.progress import console

    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


@command("build-memory-bank", no_args_is_help=True)
def build_memory_bank_command(
    shards: Path = typer.Option(..., "--shards", help="Prepared directory (SHARDS_DIR) of `ddeseg prepare`."),
    k: int | None = typer.Option(None, "--k", help="Centroids (K-Means clusters) per class. (config: memory_bank.k, default 128)"),
    out: Path = typer.Option(..., "--out", help="Output folder (BANK_DIR): bank.npy, bank.json, embeddings.parquet, config.yaml."),
    config: Path | None = options.config_option("Config YAML (memory_bank, model, and task as the default of --task); default: the built-in defaults."),
    audio_checkpoint: Path | None = typer.Option(None, "--audio-checkpoint", exists=True, dir_okay=False, help="Weights of the frozen audio backbone (e.g. RUN_DIR/audio.pt of `ddeseg pretrain-audio`)."),
    task: str | None = options.task_option("Task whose training shards are read (v1s, v1m, v2, VPO-*); default: the config's."),
    reuse_embeddings: bool = typer.Option(False, "--reuse-embeddings", help="Re-cluster BANK_DIR/embeddings.parquet of an earlier run instead of embedding again."),
    niter: int | None = typer.Option(None, "--niter", help="K-Means iterations. (config: memory_bank.niter, default 25)"),
    nredo: int | None = typer.Option(None, "--nredo", help="K-Means restarts; the best is kept. (config: memory_bank.nredo, default 1)"),
    seed: int | None = typer.Option(None, "--seed", help="K-Means random seed (same seed, same bank on the CPU). (config: memory_bank.seed, default 0)"),
    spherical: bool | None = typer.Option(None, "--spherical", help="Cosine K-Means: normalised embeddings, unit-length centroids. (config: memory_bank.spherical)"),
    include_multi_source: bool | None = typer.Option(None, "--include-multi-source", help="Also use samples with several sounding classes, for each of their classes. (config: memory_bank.include_multi_source)"),
    silence_row: bool | None = typer.Option(None, "--silence-row", help="Cluster silent samples into the background row (otherwise it is filled like a missing class). (config: memory_bank.silence_row)"),
    allow_missing_classes: bool | None = typer.Option(None, "--allow-missing-classes", help="Fill classes without any sample instead of failing. (config: memory_bank.allow_missing_classes)"),
    missing_fill: MissingFill | None = typer.Option(None, "--missing-fill", help="Row of a class without samples: global_mean or zeros. (config: memory_bank.missing_fill, default global_mean)"),
    device: str | None = options.device_option("Embedding and FAISS device: "),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Clips per embedding batch. (config: memory_bank.batch_size, default 64)"),
    override: list[str] = options.set_option("memory_bank.k=64"),
    quiet: bool = options.quiet_option(),
    print_config: bool = options.print_config_option(),
) -> None:
    """Training shards -> per-class K-Means audio memory bank (BANK_DIR/bank.npy: classes x k x dim, float32).

    Embeds the log-mel of every annotated training sample with the frozen audio backbone, then clusters each class with FAISS K-Means on all its points. A class with fewer than k samples keeps its points plus copies of its mean (with a warning); see BANK_DIR/bank.json for the counts.

    Examples:

        ddeseg build-memory-bank --shards shards/avs --k 128 --out bank/v2 --config configs/v2.yaml --audio-checkpoint runs/audio/audio.pt

        ddeseg build-memory-bank --shards shards/avs --k 64 --out bank/v2 --reuse-embeddings

        ddeseg build-memory-bank --shards shards/vpo --task VPO-MS --k 5 --out bank/vpo --include-multi-source --allow-missing-classes
    """
    from rich.console import Console

    from ddeseg.pipelines.build_memory_bank import MemoryBankPaths, build_memory_bank, summary_table
    from ddeseg.stage import RunOptions

    settings = {
        "task": task,
        "memory_bank.k": k,
        "memory_bank.niter": niter,
        "memory_bank.nredo": nredo,
        "memory_bank.seed": seed,
        "memory_bank.spherical": spherical,
        "memory_bank.include_multi_source": include_multi_source,
        "memory_bank.silence_row": silence_row,
        "memory_bank.allow_missing_classes": allow_missing_classes,
        "memory_bank.missing_fill": missing_fill,
        "memory_bank.batch_size": batch_size,
    }
    resolved = options.stage_config(config, override, settings, print_config)
    paths = MemoryBankPaths(shards, out, audio_checkpoint=audio_checkpoint, reuse_embeddings=reuse_embeddings)
    with warnings.catch_warnings(), options.exit_130_on_interrupt():  # restores the usual warning printer afterwards
        warnings.showwarning = _one_line_warning
        result = build_memory_bank(resolved, paths, RunOptions(device=device, progress=not quiet))
    Console().print(summary_table(result))
