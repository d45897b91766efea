"""`ddeseg prepare`: parse arguments, build the config (`prepare` section), call `ddeseg.pipelines.prepare.prepare`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command


class Layout(str, Enum):
    avsbench = "avsbench"
    ddeseg = "ddeseg"
    vpo = "vpo"


OnError = options.config_choices("OnError", "prepare.on_error")
AVSBenchPart = options.config_choices("AVSBenchPart", "prepare.avsbench_part")


@command("prepare", no_args_is_help=True)
def prepare_command(
    layout: Layout = typer.Option(..., "--layout", help="Raw layout: avsbench (original AVSBench releases), ddeseg (DDESeg reorganised AVSS/VPO), vpo (original VPO); see docs/datasets.md."),
    root: Path = typer.Option(..., "--root", help="Raw dataset folder (RAW_DIR)."),
    out: Path = typer.Option(..., "--out", help="Output folder (SHARDS_DIR): shards, manifest.parquet, classes.json, prepare.json, rejects.jsonl, config.yaml."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks: v1s,v1m,v2 and/or VPO-SS,VPO-MS,VPO-MSMI; default: every task found under --root."),
    config: Path | None = options.config_option("Config YAML (prepare, model.frontend, data.clip_seconds, data.samples_per_shard, data.vpo_audio); default: the built-in defaults, Config()."),
    workers: int | None = typer.Option(None, "--workers", help="Processes that read and check frames; the output is the same for any number. (config: prepare.workers, default 1)"),
    on_error: OnError | None = typer.Option(None, "--on-error", help="skip: list bad frames in rejects.jsonl and go on; fail: stop at the first one. (config: prepare.on_error, default skip)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace everything an earlier prepare wrote to --out (all tasks), instead of keeping its finished shards and the other tasks' shards."),
    export_bbox_json: bool | None = typer.Option(None, "--export-bbox-json", help="Also write SHARDS_DIR/bbox/{avss,vpo}_bbox_orisize.json in the official DDESeg form. (config: prepare.export_bbox_json)"),
    avsbench_part: AVSBenchPart | None = typer.Option(None, "--avsbench-part", help="avsbench layout: auto (AVSBench-semantic where it lists a subset, else AVSBench-object), semantic or object. (config: prepare.avsbench_part, default auto)"),
    device: str | None = options.device_option("Log-mel device: "),
    audio_checkpoint: Path | None = typer.Option(
        None,
        "--audio-checkpoint",
        dir_okay=False,
        help="HTS-AT or full DDESeg checkpoint whose mel filterbank (logmel_extractor.melW, and STFT kernels) makes the log-mels instead of the config's. Use it with the checkpoint you will pass to `ddeseg train --init` or `build-memory-bank --audio-checkpoint`: the official model's filterbank comes from the HTS-AT checkpoint (its yaml's fmax 50 gives NaNs), and loading it replaces the model's. Not needed for `ddeseg pretrain-audio` checkpoints (they carry the config's filterbank).",
    ),
    override: list[str] = options.set_option("data.samples_per_shard=512"),
    quiet: bool = options.quiet_option(),
    print_config: bool = options.print_config_option(),
) -> None:
    """Raw AVSBench / DDESeg / VPO dataset -> unified WebDataset shards (log-mel, boxes).

    Re-running resumes: finished shards are kept (--overwrite starts over). Preparing other tasks into a folder adds them: the tasks already there are kept (or the run refuses, before writing, when their shards would not fit: another class list or audio front end). Bad frames are listed in SHARDS_DIR/rejects.jsonl. Without --config the built-in defaults are used (22.05 kHz, 1 s clips, 256 samples per shard).

    Examples, one per layout:

        ddeseg prepare --layout avsbench --root data/AVSBench --out shards/avs --tasks v1s,v1m,v2

        ddeseg prepare --layout ddeseg --root data/DDESeg --out shards/ddeseg --workers 8

        ddeseg prepare --layout vpo --root data/audio_visual --out shards/vpo --tasks VPO-SS,VPO-MS --on-error fail
    """
    from rich.console import Console

    from ddeseg.pipelines.prepare import PreparePaths, prepare, summary_table
    from ddeseg.stage import RunOptions

    settings = {
        "prepare.workers": workers,
        "prepare.on_error": on_error,
        "prepare.export_bbox_json": export_bbox_json,
        "prepare.avsbench_part": avsbench_part,
    }
    resolved = options.stage_config(config, override, settings, print_config)
    paths = PreparePaths(
        layout=layout.value,
        root=root,
        out=out,
        tasks=[task.strip() for task in tasks.split(",") if task.strip()] if tasks else None,
        audio_checkpoint=audio_checkpoint,
    )
    with options.exit_130_on_interrupt():
        result = prepare(resolved, paths, RunOptions(device=device, progress=not quiet, overwrite=overwrite))
    Console().print(summary_table(result))
