"""The paper's training recipe around the step: the official learning-rate schedule, the AdamW
groups, and eight official training iterations (`train_curve.npz`, ../shared/reference/README.md
"Fourth fixture").

The schedule's oracle is torch's own `SequentialLR(LambdaLR, CosineAnnealingLR)` built the way
the official `util_tools/schedulers.py` builds it (the recursive cosine inside SequentialLR,
not a closed form), stepped after every optimizer step; the fixture is the official code's own
output.
"""

from __future__ import annotations

import copy
import json
import math
import zlib

import numpy as np
import pytest
import torch
from reference_data import reference_file
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)
from test_reference_fixtures import TRAIN_STEP_OVERRIDES

from ddeseg.config import load_config
from ddeseg.distributed import DistributedContext
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model
from ddeseg.models.reference import SCALE, fill_reference_weights
from ddeseg.pipelines.train import Run, build_optimizer, build_scheduler, learning_rate_factor, train_step
from ddeseg.training.schedule import epoch_schedule

PAPER_CONFIGS = ("v1s", "v1m", "v2", "VPO-SS", "VPO-MS", "VPO-MSMI")


def torch_official_lrs(*, epochs: int, steps_per_epoch: int, warmup_epochs: float, base_lr: float, min_lr: float, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps runs at, from torch's schedulers arranged as the
    official `build_scheduler(config, optimizer, num_steps)` (start_epoch 0)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=min_lr)
    scheduler: torch.optim.lr_scheduler.LRScheduler = cosine
    if warmup_epochs > 0:
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step / max(1, warmup_steps) if step < warmup_steps else 1.0
        )
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def official_config(name: str, *, steps_per_epoch: int, overrides: list[str] | None = None):
    """`configs/<name>.yaml` with the steps derived as the trainer does for `steps_per_epoch`."""
    config = load_config(name, overrides or [])
    config.train.steps, config.train.warmup_steps = epoch_schedule(config.train, steps_per_epoch)
    return config


def our_lrs(config, steps: range) -> list[float]:
    return [config.train.base_lr * learning_rate_factor(step, config) for step in steps]


# ---- the schedule


def test_two_epochs_of_four_steps_with_one_warmup_epoch():
    config = official_config("tiny", steps_per_epoch=4, overrides=["train.epochs_equivalent=2", "train.warmup_epochs=1"])
    assert config.train.schedule == "official" and (config.train.steps, config.train.warmup_steps) == (8, 4)
    base, low = 1e-4, 4e-5
    assert (config.train.base_lr, config.train.min_lr) == (base, low)
    # By hand: warm-up from 0 in quarters; the cosine restarts at base_lr at step 4 with T_max 8
    # (the warm-up counted), so it is half-way down (cos(pi/2)) only at step 8, after the run.
    by_hand = [0.0, base / 4, base / 2, 3 * base / 4, base] + [low + (base - low) * (1 + math.cos(math.pi * k / 8)) / 2 for k in (1, 2, 3)]
    ours = our_lrs(config, range(9))
    np.testing.assert_allclose(ours[:8], by_hand, rtol=1e-12, atol=0)
    assert ours[8] == pytest.approx(7e-5, rel=1e-12)  # the fixture's next_lr: never down to min_lr
    oracle = torch_official_lrs(epochs=2, steps_per_epoch=4, warmup_epochs=1, base_lr=base, min_lr=low, steps=9)
    np.testing.assert_allclose(ours, oracle, rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "warmup_epochs"),
    [(3, 7, 0), (5, 3, 1.5), (4, 10, 2), (2, 7, 0.5)],  # no warm-up; fractional warm-ups (3.5 steps: 3)
)
def test_official_schedule_matches_torchs_sequential_lr(epochs, steps_per_epoch, warmup_epochs):
    overrides = [f"train.epochs_equivalent={epochs}", f"train.warmup_epochs={warmup_epochs}", "train.base_lr=1e-3"]
    config = official_config("v2", steps_per_epoch=steps_per_epoch, overrides=overrides)
    steps = epochs * steps_per_epoch
    oracle = torch_official_lrs(epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs, base_lr=1e-3, min_lr=4e-5, steps=steps + 3)
    # Three steps past T_max (a run extended by --steps): torch's cosine rises again, and so does ours.
    np.testing.assert_allclose(our_lrs(config, range(steps + 3)), oracle, rtol=1e-10, atol=1e-20)


def test_v2_yaml_schedule_at_its_landmarks():
    """configs/v2.yaml (150 epochs, 2 of warm-up, base 1e-4, min 4e-5) on data of 200 steps per
    epoch (e.g. 10,000 frames at batch 50): steps 0, 1, the last warm-up step, the warm-up end,
    the middle and the last step, against the formula written out from the official source."""
    config = official_config("v2", steps_per_epoch=200)
    total, warmup = 150 * 200, 2 * 200
    assert (config.train.steps, config.train.warmup_steps) == (total, warmup)
    base, low = 1e-4, 4e-5

    def official(step: int) -> float:
        if step < warmup:
            return base * step / warmup
        return low + (base - low) * (1 + math.cos(math.pi * (step - warmup) / total)) / 2

    landmarks = [0, 1, warmup - 1, warmup, total // 2, total - 1]
    ours = our_lrs(config, landmarks)
    np.testing.assert_allclose(ours, [official(s) for s in landmarks], rtol=1e-12, atol=0)
    assert ours[0] == 0.0 and ours[3] == base
    assert ours[-1] > low * (1 + 1e-4)  # the quirk: the cosine spans the warm-up too, never reaching min_lr
    oracle = torch_official_lrs(epochs=150, steps_per_epoch=200, warmup_epochs=2, base_lr=base, min_lr=low, steps=total)
    np.testing.assert_allclose(ours, [oracle[s] for s in landmarks], rtol=1e-9, atol=0)


@pytest.mark.parametrize("resume_at", [3, 4, 6])
def test_resume_at_any_step_gives_the_same_tail(resume_at):
    """Optimizer and scheduler state saved after `resume_at` steps and loaded into a fresh pair
    (what --resume does) continue with exactly the lrs of the uninterrupted run."""
    config = official_config("tiny", steps_per_epoch=4, overrides=["train.epochs_equivalent=2", "train.warmup_epochs=1"])
    model = torch.nn.Linear(3, 2)

    def pair():
        optimizer = build_optimizer(model, config)
        return optimizer, build_scheduler(optimizer, config)

    def run(optimizer, scheduler, steps: int) -> list[list[float]]:
        lrs = []
        for _ in range(steps):
            lrs.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        return lrs

    straight = run(*pair(), 8)
    first, first_scheduler = pair()
    head = run(first, first_scheduler, resume_at)
    state = {"optimizer": first.state_dict(), "lr_scheduler": first_scheduler.state_dict()}
    resumed, resumed_scheduler = pair()
    resumed.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["lr_scheduler"])
    assert head + run(resumed, resumed_scheduler, 8 - resume_at) == straight
    assert [lr for lr, _ in straight] == our_lrs(config, range(8))


def test_paper_configs_use_the_official_recipe_and_the_demo_ours():
    for name in PAPER_CONFIGS:
        config = load_config(name)
        assert config.train.schedule == "official", name
        assert config.train.grad_clip is None and config.train.precision == "fp32", name  # no clipping, no loss scaling
        assert config.data.augment.jitter_before_resize, name
        assert (config.train.base_lr, config.train.min_lr, config.train.weight_decay) == (1e-4, 4e-5, 0.05), name
        assert tuple(config.train.betas) == (0.9, 0.999) and config.train.eps == 1e-8, name
    demo = load_config("demo")
    assert demo.train.schedule == "warmup_cosine" and not demo.data.augment.jitter_before_resize


def test_schedule_key_is_checked_and_named_in_the_start_up_table():
    from ddeseg.config import ConfigError
    from ddeseg.pipelines.train import _schedule_text

    with pytest.raises(ConfigError, match="train.schedule must be one of official, warmup_cosine, got 'cosine'"):
        load_config("v2", ["train.schedule=cosine"])
    official = official_config("v2", steps_per_epoch=200)
    assert _schedule_text(official) == "official: warm-up 0 -> 0.0001 over 400 steps, then cosine (T_max 30000) toward 4e-05"
    assert _schedule_text(load_config("demo")).startswith("warmup_cosine (ours): 4e-06 -> 0.001 over 30 steps")


# ---- eight official training iterations


@pytest.fixture(scope="module")
def curve():
    return dict(np.load(reference_file("train_curve.npz")))


def _fixture_config(curve):
    meta = json.loads(str(curve["meta_json"]))
    overrides = TRAIN_STEP_OVERRIDES + [f"train.epochs_equivalent={meta['epochs']}", f"train.warmup_epochs={meta['warmup_epochs']}"]
    config = official_config("tiny", steps_per_epoch=meta["steps_per_epoch"], overrides=overrides)
    train = config.train
    assert (train.steps, train.warmup_steps) == (meta["T_max"], meta["warmup_steps"])
    assert (train.base_lr, train.min_lr, train.weight_decay, train.eps) == (meta["base_lr"], meta["min_lr"], meta["weight_decay"], meta["eps"])
    assert list(train.betas) == meta["betas"] and train.grad_clip is None and train.grad_accum == 1
    loss = config.loss
    assert (loss.ce_weight, loss.focal_weight, loss.dice_weight, loss.iou_weight) == tuple(meta["loss_weights"].values())
    return config


@pytest.fixture(scope="module")
def filled_model(curve):
    """The fixture's model (weights by the first recipe, its bank, float64), built once."""
    torch.manual_seed(0)
    model = build_model(_fixture_config(curve).model)
    fill_reference_weights(model, scale=SCALE)
    model.set_memory_bank(curve["bank"])
    model = model.double()
    model.set_clustering_noise(False)
    return model


def fixture_run(curve, filled_model) -> Run:
    """The fixture's run, built with our pieces: the tiny config with the official schedule over
    2 epochs of 4 steps and its determinism choices, a fresh copy of the filled model."""
    config = _fixture_config(curve)
    model = copy.deepcopy(filled_model)
    optimizer = build_optimizer(model, config)
    return Run(
        config=config,
        request=None,
        context=DistributedContext(),
        inputs=None,
        model=model,
        train_model=model,
        loss_fn=SegmentationLoss(config.loss, config.model.num_classes),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config),
        scaler=torch.amp.GradScaler("cuda", enabled=False),
    )


def test_optimizer_groups_are_the_official_ones(curve, filled_model):
    """Group 0 (weight decay) / group 1 (none) per parameter name, as the official code made them
    for this model, and as its rule (`len(shape) == 1 or name.endswith('.bias')`) says."""
    run = fixture_run(curve, filled_model)
    names = [name for name, p in run.model.named_parameters() if p.requires_grad]
    assert names == list(curve["trainable_param_names"])
    by_id = {id(p): name for name, p in run.model.named_parameters()}
    ours = [[by_id[id(p)] for p in group["params"]] for group in run.optimizer.param_groups]
    theirs = [[n for n, g in zip(names, curve["param_group"], strict=True) if g == group] for group in (0, 1)]
    assert ours == theirs and (len(ours[0]), len(ours[1])) == (91, 108)
    shapes = dict(run.model.named_parameters())
    assert all(p.ndim >= 1 for p in shapes.values())  # no 0-d parameter (ours and the official rule would differ)
    assert ours[1] == [n for n in names if shapes[n].ndim == 1 or n.endswith(".bias")]
    assert [g["weight_decay"] for g in run.optimizer.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 0.0 and g["initial_lr"] == 1e-4 for g in run.optimizer.param_groups)  # step 0 runs at lr 0
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and not g["amsgrad"] for g in run.optimizer.param_groups)
    frozen = [n for n, p in run.model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("audio_model.") for n in frozen)  # in neither group


def _scale_errors(model: torch.nn.Module, names: list[str], curve) -> dict[str, float]:
    """Worst relative error over the parameters of the final L2 norm, signed projection and sum,
    each relative to the parameter's scale (README "Tolerance")."""
    parameters = dict(model.named_parameters())
    worst = {"l2": 0.0, "proj": 0.0, "sum": 0.0}
    for i, name in enumerate(names):
        p = parameters[name].detach()
        scale = curve["final/param_l2"][i]
        signs = torch.randint(0, 2, p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())), dtype=torch.int64) * 2 - 1
        worst["l2"] = max(worst["l2"], abs(float(p.norm()) - scale) / scale)
        worst["proj"] = max(worst["proj"], abs(float((p * signs).sum()) - curve["final/param_proj"][i]) / scale)
        worst["sum"] = max(worst["sum"], abs(float(p.sum()) - curve["final/param_sum"][i]) / (scale * math.sqrt(p.numel())))
    return worst


def test_eight_official_iterations(curve, filled_model):
    """Our optimizer builder, schedule and `train_step` on the fixture's 8 batches: per-step lrs
    of both groups, loss terms and global gradient norm at rtol 1e-6; the final parameters and
    AdamW state within 1e-6 of their scale."""
    run = fixture_run(curve, filled_model)
    names = list(curve["trainable_param_names"])
    parameters = dict(run.model.named_parameters())
    initial = np.array([float(parameters[n].detach().sum()) for n in names])
    np.testing.assert_allclose(initial, curve["initial/param_sum"], rtol=1e-12, atol=1e-12)

    seen: dict[str, list] = {"lr": [], "grad_norm": [], "loss": []}

    def before_step(optimizer, args, kwargs):
        seen["lr"].append([group["lr"] for group in optimizer.param_groups])
        grads = [p.grad.norm() for p in parameters.values() if p.grad is not None]
        seen["grad_norm"].append(float(torch.stack(grads).norm()))

    run.optimizer.register_step_pre_hook(before_step)
    steps_per_epoch = int(curve["steps/iter_in_epoch"].max()) + 1
    for i in range(len(curve["steps/total_loss"])):
        if i % steps_per_epoch == 0:
            run.model.train()  # at every epoch start, as the official loop (and ours)
        batch = {"image": torch.from_numpy(curve["image"][i]).double(), "logmel": torch.from_numpy(curve["logmel"][i]), "mask": torch.from_numpy(curve["mask"][i])}
        run.window.running.clear()
        assert train_step(run, [batch]) is True
        seen["loss"].append([run.window.running[k] for k in ("ce_loss", "dice_loss", "iou_loss", "loss")])

    np.testing.assert_allclose(seen["lr"], curve["steps/lr"], rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose([g["lr"] for g in run.optimizer.param_groups], curve["next_lr"], rtol=1e-6)
    losses = np.array(seen["loss"])
    for column, key in enumerate(("loss/ce_loss", "loss/dice_loss", "loss/iou", "total_loss")):
        np.testing.assert_allclose(losses[:, column], curve[f"steps/{key}"], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(seen["grad_norm"], curve["steps/global_grad_norm"], rtol=1e-6)

    worst = _scale_errors(run.model, names, curve)
    assert max(worst.values()) <= 1e-6, worst
    for name in curve["final_param_names"]:
        ours, reference = parameters[str(name)].detach().numpy(), curve[f"final/param/{name}"]
        assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max(), name
    untouched = set(curve["none_grad_names"])
    assert untouched and all(float(parameters[n].detach().sum()) == curve["initial/param_sum"][names.index(n)] for n in untouched)
    state = run.optimizer.state
    steps = [int(state[parameters[n]]["step"]) if parameters[n] in state else 0 for n in names]
    assert steps == [int(s) for s in curve["adam/step"]]  # lr-0 step included: 8 for all but the never-graded
    exp_avg_sq = [float(state[parameters[n]]["exp_avg_sq"].norm()) if parameters[n] in state else 0.0 for n in names]
    # atol: the aligners' fc.bias gradients are mathematically 0 (rounding noise, ~1e-20).
    np.testing.assert_allclose(exp_avg_sq, curve["adam/exp_avg_sq_l2"], rtol=1e-5, atol=1e-30)
    exp_avg = [float(state[parameters[n]]["exp_avg"].norm()) if parameters[n] in state else 0.0 for n in names]
    np.testing.assert_allclose(exp_avg, curve["adam/exp_avg_l2"], rtol=1e-5, atol=1e-14)
