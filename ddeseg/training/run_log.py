"""Where training metrics go: `RUN_DIR/metrics.jsonl` always, TensorBoard and Weights & Biases
when the config asks for them (`train.tensorboard`, `train.wandb`).

Only rank 0 logs. W&B honours its own environment (`WANDB_MODE=offline` works with no network:
the run is written under `RUN_DIR/wandb/` and can be synced later with `wandb sync`). Both are
optional packages (`pip install ddeseg[tracking]`); asking for one that is not installed is a
clear error, not a silent no-op.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddeseg.errors import DDESegError


class RunLog:
    """Append-only metrics log of one run (create it on rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "ddeseg",
        config: dict[str, Any] | None = None,
        resume: bool = False,
        console_copy: Any = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._console_copy = console_copy  # a `ddeseg.training.run_info.ConsoleCopy`, stopped on close
        if not resume:
            self.path.write_text("")  # a new run starts a new log; --resume appends
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise DDESegError(
                    "train.tensorboard is true but TensorBoard is not installed: pip install tensorboard"
                ) from error
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as error:
                raise DDESegError(
                    "train.wandb is true but Weights & Biases is not installed: pip install wandb"
                    " (set WANDB_MODE=offline to log without a network)"
                ) from error
            self._wandb = wandb_module.init(
                project=wandb_project, dir=str(run_dir), config=config or {}, name=run_dir.name, resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        """One event: a JSON line; its numbers (with a `step`) also go to TensorBoard/W&B, under
        `train/` or `{split}/` (e.g. `val/miou`)."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        step = record.get("step")
        if step is None or (self._tensorboard is None and self._wandb is None):
            return
        prefix = record.get("split", "train")
        scalars = {
            f"{prefix}/{name}": float(value)
            for name, value in record.items()
            if name not in ("step", "epoch", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._console_copy is not None:
            self._console_copy.stop()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
