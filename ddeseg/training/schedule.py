"""The learning-rate schedules of the two training recipes (`ddeseg train`, `ddeseg
pretrain-audio`), each a pure function of the global step (so a resumed run gets the same tail):
`official_lr` (the official DDESeg scheduler, quirks included) and `warmup_cosine_lr` (ours:
linear warm-up, then cosine to exactly `min_lr`); `train.schedule` picks one (`SCHEDULES`),
`scheduled_lr` applies the choice, `epoch_schedule` turns a schedule in epochs into steps as the
chosen schedule does.

The run folder is `ddeseg.training.run_info`'s, the checkpoint `ddeseg.training.checkpoint`'s and
the metrics log `ddeseg.training.run_log.RunLog`.
"""

from __future__ import annotations

import math

from ddeseg.config import TRAINING_KEY_CHOICES, TrainConfig
from ddeseg.errors import DDESegError

# `train.schedule` values (the config checks them): the official scheduler's sequence, and ours.
SCHEDULES = TRAINING_KEY_CHOICES["train.schedule"]


def official_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) under the official DDESeg scheduler.

    The official `util_tools/schedulers.py` chains, with torch's `SequentialLR` stepped after
    every optimizer step, a `LambdaLR` warm-up `step / warmup_steps` and a
    `CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)` that takes over at the milestone
    `warmup_steps` (torch restarts it there with `step(0)`, i.e. at `base_lr`). Written as a
    closed form of the step:

    - `step < warmup_steps`: `base_lr * step / warmup_steps`, so step 0 runs at lr 0 (its
      `warmup_lr` is never read);
    - after: `min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - warmup_steps) / total_steps)) / 2`.
      `T_max` counts the warm-up steps too, so the cosine never reaches `min_lr` (with v2.yaml's
      150 epochs, 2 of them warm-up, the last step is still 0.044 % of `base_lr - min_lr` above
      it); past `T_max` it rises again, as torch's does.

    `total_steps` is the official `epochs x steps per epoch`; `warmup_steps` is 0 when there is
    no warm-up (the official code then uses the cosine alone, from step 0). One quirk is not
    reproduced: a warm-up shorter than one step (`0 < warmup_epochs x steps per epoch < 1`) makes
    the official `SequentialLR` run the cosine one step late; here it is no warm-up.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    cosine_step = step - warmup_steps
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * cosine_step / total_steps)) / 2


def epoch_schedule(train: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """`(steps, warmup_steps)` of a schedule given in epochs (`train.epochs_equivalent`,
    `train.warmup_epochs`) over data of `steps_per_epoch` optimizer steps; the config's own
    `steps` / `warmup_steps` where it gives none. Warm-up epochs become steps as the chosen
    schedule does: the official scheduler truncates (`int(warmup_epochs * steps)`), ours rounds."""
    if train.epochs_equivalent is None:
        return train.steps, train.warmup_steps
    steps = train.epochs_equivalent * steps_per_epoch
    if train.warmup_epochs is None:
        return steps, train.warmup_steps
    exact = train.warmup_epochs * steps_per_epoch
    return steps, int(exact) if train.schedule == "official" else round(exact)


def scheduled_lr(
    schedule: str, step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float
) -> float:
    """The learning rate of optimizer step `step` under `schedule` (one of `SCHEDULES`)."""
    if schedule == "official":
        return official_lr(step, base_lr=base_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    if schedule == "warmup_cosine":
        return warmup_cosine_lr(
            step, base_lr=base_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps, warmup_lr=warmup_lr
        )
    raise DDESegError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def warmup_cosine_lr(
    step: int,
    *,
    base_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    warmup_lr: float | None = None,
) -> float:
    """Our schedule (`train.schedule: warmup_cosine`): the learning rate of optimizer step `step`
    (0-based), a linear warm-up to `base_lr` over `warmup_steps`, then a half cosine from
    `base_lr` to `min_lr` ending at `total_steps`.

    Two warm-up forms, kept because each recipe's results depend on its own:
    - `warmup_lr` given (train): step 0 runs at `warmup_lr`, step `warmup_steps` at `base_lr`.
      (The official scheduler warms up from 0 ignoring its own `warmup_lr` and runs its cosine
      over all steps including the warm-up; we honour `warmup_lr` and run the cosine over the
      remaining steps so the schedule ends exactly at `min_lr`.)
    - `warmup_lr` None (pretrain-audio): from zero, step 0 already at `base_lr / warmup_steps`
      and step `warmup_steps - 1` at `base_lr`.
    """
    if step < warmup_steps:
        if warmup_lr is None:
            return base_lr * (step + 1) / warmup_steps
        progress = step / max(1, warmup_steps)
        return warmup_lr + (base_lr - warmup_lr) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
