"""The shared training loop: one-cycle LR, the stability guard, checkpoints and exact resume."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from pokesprite.config import TrainConfig
from pokesprite.tracking import Tracker
from pokesprite.checkpoints import load_checkpoint
from pokesprite.train.loop import Stage, fit, make_scheduler
from pokesprite.train.stability import TrainingDiverged

STEPS = 20  # batches per epoch of the toy stage


def toy_stage(*, bad_steps=(), inf_grad_steps=(), huge_steps=(), ema_decay=0.0, seed=0, steps=STEPS):
    """Linear regression on fresh random batches; chosen global steps give a NaN loss, an inf gradient or x1e4."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    calls = {"n": 0}

    def batches(epoch):
        for _ in range(steps):
            x = torch.randn(16, 4, generator=g)
            yield x, x @ w_true.T

    def loss(batch, epoch):
        calls["n"] += 1
        x, y = batch
        out = ((model(x) - y) ** 2).mean()
        if calls["n"] in bad_steps:
            out = out * float("nan")
        if calls["n"] in huge_steps:
            out = out * 1e4
        if calls["n"] in inf_grad_steps:
            out = out + model.weight.sum() * 0.0
            out.register_hook(lambda grad: grad * float("inf"))
        return out, {}

    @torch.no_grad()
    def validate(epoch):
        return {"val_loss": float(((model.weight - w_true) ** 2).sum())}

    return Stage(name="toy", model=model, loss=loss, batches=batches, validate=validate,
                 export=lambda: {"weights": model.state_dict()}, generator=g, steps_per_epoch=steps,
                 ema_decay=ema_decay, config={"toy": True})


def cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.2, weight_decay=0.0, warmup_frac=0.1, grad_clip=10.0,
                max_bad_batches=50, checkpoint_every=1)
    return TrainConfig(**{**base, **kw})


def test_onecycle_warms_up_for_ten_percent_then_anneals_to_zero():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    c = cfg(epochs=10, lr=1e-3)
    sched = make_scheduler(opt, c, steps_per_epoch=10)  # 100 steps, peak after 10
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9  # the 10th of 100 steps
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # cosine both ways: up from lr/25 over steps 0-9, down to lr/25/1e4 over steps 9-99
    start, peak, end = 1e-3 / 25, 1e-3, 1e-3 / 25 / 1e4
    for k in range(100):
        up, frac = (True, k / 9) if k <= 9 else (False, (k - 9) / 90)
        expected = (start + (peak - start) * (1 - math.cos(math.pi * frac)) / 2 if up
                    else end + (peak - end) * (1 + math.cos(math.pi * frac)) / 2)
        assert lrs[k] == pytest.approx(expected, rel=1e-9), k


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_onecycle_works_for_any_number_of_steps(steps):
    """10 steps at warmup_frac 0.1 (and 20 at 0.05) make OneCycleLR divide by zero unless guarded."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    c = cfg(epochs=1, lr=1e-3, warmup_frac=0.1 if steps != 20 else 0.05)
    sched = make_scheduler(opt, c, steps_per_epoch=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert all(math.isfinite(lr) and 0 <= lr <= 1e-3 * (1 + 1e-9) for lr in lrs)
    if steps >= 10:  # a one-step warm-up: lr/25 first, the peak right after, then down to ~0
        assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[1] == max(lrs) > 0.95e-3
        assert lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_fit_learns_and_writes_best_last_and_periodic_checkpoints(tmp_path):
    tracker = Tracker()
    stage = toy_stage()
    start = stage.validate(0)["val_loss"]
    result = fit(stage, cfg(checkpoint_every=2), out_dir=tmp_path, tracker=tracker)
    assert result.history[-1]["val_loss"] < 0.01 * start
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "epoch_0002.pt", "last.pt"]
    ckpt = load_checkpoint(tmp_path / "last.pt", "toy")
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3 and ckpt["stage_config"] == {"toy": True}
    assert set(ckpt["train"]) >= {"model", "optimizer", "scheduler", "ema", "guard", "rng", "history", "epoch"}
    assert ckpt["train_config"]["lr"] == 0.2
    # each set of weights once per file: the inference weights in best.pt only, training state in last.pt only
    best = load_checkpoint(tmp_path / "best.pt", "toy")
    assert "weights" not in ckpt and "train" not in best and set(best["weights"]) == set(ckpt["train"]["model"])
    for key in ("lr", "grad_norm_mean", "grad_norm_max", "skipped_batches", "grad_explosions"):
        assert len(tracker.history[key]) == 3


def test_nan_loss_and_inf_gradient_batches_are_skipped_and_counted(tmp_path):
    stage = toy_stage(bad_steps={3, 5}, inf_grad_steps={25})  # epoch 1 has steps 1-20
    tracker = Tracker()
    result = fit(stage, cfg(), out_dir=tmp_path, tracker=tracker)
    assert result.skipped_batches == 3
    assert [v for _, v in tracker.history["skipped_batches"]] == [2, 1, 0]
    assert all(torch.isfinite(p).all() for p in stage.model.parameters())
    assert result.history[-1]["val_loss"] < 1.5  # training went on normally


def test_too_many_bad_batches_stop_with_a_clear_message(tmp_path):
    stage = toy_stage(bad_steps=set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=r"toy: stopped after 5 batches .* Lower toy.train.lr"):
        fit(stage, cfg(max_bad_batches=5), out_dir=tmp_path)


def test_gradient_explosion_is_detected_and_clipped_to_the_running_norm(tmp_path):
    tracker = Tracker()
    ok = fit(toy_stage(), cfg(epochs=2), out_dir=tmp_path / "a", tracker=Tracker())
    result = fit(toy_stage(huge_steps={30}), cfg(epochs=2), out_dir=tmp_path / "b", tracker=tracker)
    assert result.explosions == 1 and ok.explosions == 0
    # clipped to the typical norm, the 10000x batch barely changes the outcome
    assert result.history[-1]["val_loss"] < 2 * ok.history[-1]["val_loss"] + 0.05


def test_the_guard_clips_an_explosion_to_the_running_mean_and_leaves_the_mean_alone():
    from pokesprite.train.stability import MOMENTUM, WARMUP_STEPS, StabilityGuard

    guard = StabilityGuard(cfg(grad_clip=10.0), "toy")
    p = nn.Parameter(torch.zeros(2))

    def step(norm):
        p.grad = torch.tensor([0.6, 0.8]) * norm  # a gradient of exactly that norm
        guard.step(torch.tensor(1.0), [p])
        return float(p.grad.norm())

    for _ in range(WARMUP_STEPS):
        assert step(2.0) == pytest.approx(2.0)  # typical: untouched (below grad_clip)
    assert guard.state_dict()["mean_norm"] == pytest.approx(2.0)
    assert step(100.0) == pytest.approx(2.0, rel=1e-5)  # over 5x the mean: clipped to the mean, not to grad_clip
    assert guard.explosions == 1 and guard.state_dict()["mean_norm"] == pytest.approx(2.0)  # not absorbed
    assert step(9.0) == pytest.approx(9.0)  # 4.5x the mean: typical, and below grad_clip
    assert guard.state_dict()["mean_norm"] == pytest.approx(MOMENTUM * 2.0 + (1 - MOMENTUM) * 9.0)
    assert step(11.0) == pytest.approx(10.0, rel=1e-5) and guard.explosions == 1  # typical, above grad_clip
    step(float("nan"))
    assert guard.skipped == 1 and guard.state_dict()["steps"] == WARMUP_STEPS + 2


def test_validation_and_the_saved_weights_are_the_ema(tmp_path):
    """With an EMA, each epoch validates the averaged weights, best.pt holds them and last.pt keeps
    both the live weights and the average."""
    stage = toy_stage(ema_decay=0.9)
    seen, validate = [], stage.validate

    def recording_validate(epoch):
        seen.append({k: v.clone() for k, v in stage.model.state_dict().items()})
        return validate(epoch)

    stage.validate = recording_validate
    fit(stage, cfg(epochs=1), out_dir=tmp_path)
    train = load_checkpoint(tmp_path / "last.pt", "toy")["train"]
    best = load_checkpoint(tmp_path / "best.pt", "toy")["weights"]
    shadow, live = train["ema"]["shadow"], train["model"]
    for k in live:
        assert torch.equal(seen[0][k], shadow[k]) and torch.equal(best[k], shadow[k]), k
    assert not torch.equal(live["weight"], shadow["weight"])  # the average lags the live weights
    assert torch.equal(stage.model.weight, live["weight"])  # and training goes on with the live ones


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_from_a_mid_run_checkpoint_equals_the_straight_run(tmp_path, ema_decay):
    # epoch 1 has a NaN batch and an explosion: the guard's counts and running mean resume too
    straight = fit(toy_stage(ema_decay=ema_decay, bad_steps={3}, huge_steps={15}), cfg(),
                   out_dir=tmp_path / "straight")
    resumed_stage = toy_stage(ema_decay=ema_decay, seed=99)  # different init and RNG: all must come from the file
    resumed = fit(resumed_stage, cfg(), out_dir=tmp_path / "resumed",
                  resume=tmp_path / "straight" / "epoch_0001.pt")
    assert (straight.skipped_batches, straight.explosions) == (resumed.skipped_batches, resumed.explosions) == (1, 1)
    a = load_checkpoint(tmp_path / "straight" / "last.pt", "toy")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt", "toy")
    assert a["train"]["guard"] == b["train"]["guard"]
    for name in a["train"]["model"]:
        assert torch.equal(a["train"]["model"][name], b["train"]["model"][name]), name
    for name in ("best.pt",):  # the exported (EMA) weights too
        wa, wb = (load_checkpoint(tmp_path / d / name, "toy")["weights"] for d in ("straight", "resumed"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["history"] == b["history"]


def test_resume_refuses_an_inference_only_checkpoint(tmp_path):
    fit(toy_stage(), cfg(epochs=1), out_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt", "toy")
    del ckpt["train"]
    torch.save(ckpt, tmp_path / "weights_only.pt")
    with pytest.raises(ValueError, match="inference weights only"):
        fit(toy_stage(), cfg(epochs=1), out_dir=tmp_path / "x", resume=tmp_path / "weights_only.pt")


def test_bad_train_config_is_refused():
    from pokesprite.config import ConfigError

    with pytest.raises(ConfigError, match="warmup_frac"):
        dataclasses.replace(cfg(), warmup_frac=1.5)
    assert math.isclose(cfg().warmup_frac, 0.1)


def test_time_budget_trains_fewer_epochs_and_still_anneals(tmp_path, monkeypatch):
    """max_minutes: the second epoch's time decides how many epochs run; the LR schedule is re-fitted to them."""
    from pokesprite.train import loop

    clock = {"t": 0.0}

    def fake_clock():  # every call advances 20 s: each epoch "takes" 20 s, so 3 fit a minute
        clock["t"] += 20.0
        return clock["t"]

    monkeypatch.setattr(loop.time, "perf_counter", fake_clock)
    budget = cfg(epochs=10, max_minutes=1.0)
    result = fit(toy_stage(), budget, out_dir=tmp_path)
    assert len(result.history) == 3
    assert load_checkpoint(tmp_path / "last.pt", "toy")["train"]["epochs"] == len(result.history)
    assert result.history[-1]["lr"] < 1e-3 * budget.lr  # annealed to ~0 at the shortened end
    full = fit(toy_stage(), cfg(epochs=10), out_dir=tmp_path / "full")
    assert len(full.history) == 10  # no budget: every epoch


@pytest.mark.parametrize("first, expected", [(40.0, 5), (70.0, 1)])
def test_time_budget_is_not_shrunk_by_a_slow_first_epoch(tmp_path, monkeypatch, first, expected):
    """A first epoch of 40 s (warm-up) then 5 s epochs: 45 s after two, 3 more fit the minute. A first
    epoch that alone overruns the budget ends training there."""
    from pokesprite.train import loop

    times = iter([0.0, first] + [first + 5.0 * k for k in range(1, 20)])  # one clock read per epoch
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(times))
    result = fit(toy_stage(), cfg(epochs=10, max_minutes=1.0), out_dir=tmp_path)
    assert len(result.history) == expected


def test_save_every_holds_best_in_memory_and_writes_it_at_the_next_save(tmp_path):
    def stage():
        st = toy_stage()
        scores = {1: 5.0, 2: 4.0, 3: 3.0, 4: 1.0, 5: 2.0}  # the best epoch, 4, is not a save epoch
        st.validate = lambda epoch: {"val_loss": scores[epoch]}
        return st

    fit(stage(), cfg(epochs=5, save_every=3, checkpoint_every=0), out_dir=tmp_path / "held")
    assert not (tmp_path / "held" / "epoch_0004.pt").exists()
    best = load_checkpoint(tmp_path / "held" / "best.pt", "toy")
    assert best["epoch"] == 4 and load_checkpoint(tmp_path / "held" / "last.pt", "toy")["epoch"] == 5
    fit(stage(), cfg(epochs=5, checkpoint_every=1), out_dir=tmp_path / "every")
    epoch4 = load_checkpoint(tmp_path / "every" / "epoch_0004.pt", "toy")["train"]["model"]  # = the export here
    assert all(torch.equal(epoch4[k], best["weights"][k]) for k in epoch4)  # the held copy, not later weights


def test_a_resumed_run_has_the_best_epochs_weights(tmp_path, caplog):
    """Resumed from a periodic checkpoint that was not a save epoch, or into another folder, a run
    still ends with best.pt of the best epoch; with no such file anywhere it says so."""
    def stage():
        st = toy_stage()
        scores = {1: 0.5, 2: 0.4, 3: 0.9, 4: 0.95}  # the best epoch, 2, is not a save epoch
        st.validate = lambda epoch: {"val_loss": scores[epoch]}
        return st

    every = cfg(epochs=4, save_every=3, checkpoint_every=2)
    fit(stage(), every, out_dir=tmp_path / "straight")
    straight = load_checkpoint(tmp_path / "straight" / "best.pt", "toy")
    assert straight["epoch"] == 2
    (tmp_path / "killed").mkdir()  # killed in epoch 3: what was on disk then
    for name in ("epoch_0002.pt", "best.pt"):
        (tmp_path / "killed" / name).write_bytes((tmp_path / "straight" / name).read_bytes())
    fit(stage(), every, out_dir=tmp_path / "killed", resume=tmp_path / "killed" / "epoch_0002.pt")
    fit(stage(), cfg(epochs=4), out_dir=tmp_path / "elsewhere", resume=tmp_path / "killed" / "epoch_0002.pt")
    for folder in ("killed", "elsewhere"):
        best = load_checkpoint(tmp_path / folder / "best.pt", "toy")
        assert best["epoch"] == 2 and all(torch.equal(best["weights"][k], straight["weights"][k])
                                          for k in straight["weights"]), folder
    (tmp_path / "killed" / "best.pt").unlink()
    with caplog.at_level("WARNING"):
        fit(stage(), cfg(epochs=4), out_dir=tmp_path / "lost", resume=tmp_path / "killed" / "epoch_0002.pt")
    assert "no best.pt of epoch 2" in caplog.text
    assert load_checkpoint(tmp_path / "lost" / "best.pt", "toy")["epoch"] == 3  # the best from there on


def test_bf16_precision_runs_the_forward_pass_in_bfloat16_and_still_learns(tmp_path):
    stage = toy_stage()
    seen = []
    inner = stage.loss

    def loss(batch, epoch):
        out, extra = inner(batch, epoch)
        seen.append(stage.model(batch[0]).dtype)
        return out, extra

    stage.loss = loss
    start = stage.validate(0)["val_loss"]
    result = fit(stage, cfg(precision="bf16"), out_dir=tmp_path)
    assert set(seen) == {torch.bfloat16}
    assert stage.model.weight.dtype == torch.float32  # weights (and AdamW state) stay fp32
    assert result.history[-1]["val_loss"] < 0.05 * start


def test_the_guard_decides_on_the_device_whatever_the_sync_interval(tmp_path):
    """Reading the counters every 7 steps instead of every step changes nothing the guard decides."""
    runs = {}
    for every in (1, 7):
        stage = toy_stage(bad_steps={3, 5}, inf_grad_steps={25}, huge_steps={30})
        runs[every] = (fit(stage, cfg(log_every=every), out_dir=tmp_path / str(every)), stage.model.state_dict())
    (a, wa), (b, wb) = runs[1], runs[7]
    assert (a.skipped_batches, a.explosions) == (b.skipped_batches, b.explosions) == (3, 1)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_divergence_is_caught_at_the_next_sync_point(tmp_path):
    stage = toy_stage(bad_steps=set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=r"toy: stopped after 7 batches"):
        fit(stage, cfg(max_bad_batches=5, log_every=7), out_dir=tmp_path)


def test_a_skipped_batch_leaves_weights_and_optimiser_state_untouched():
    from pokesprite.train.common import make_optimizer, optimizer_step

    model = nn.Linear(3, 1)
    opt = make_optimizer(model.parameters(), 0.1, 0.01)
    assert opt.defaults["fused"]
    model(torch.ones(2, 3)).sum().backward()
    optimizer_step(opt, torch.tensor(True))  # one real step, so there is state to keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    model(torch.ones(2, 3)).sum().backward()
    optimizer_step(opt, torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.weight].items())  # step count too
    optimizer_step(opt, torch.tensor(True))
    assert not torch.equal(before["weight"], model.weight)


def test_the_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_length(tmp_path, monkeypatch):
    """No host sync per step: with log_every larger than the epoch, host reads do not grow with steps."""
    counts = {"n": 0}
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):
            counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    reads = {}
    for every, steps in ((1000, 20), (1000, 60), (1, 20), (1, 60)):
        counts["n"] = 0
        fit(toy_stage(steps=steps), cfg(epochs=1, log_every=every), out_dir=tmp_path / f"{every}_{steps}")
        reads[every, steps] = counts["n"]
    assert reads[1000, 20] == reads[1000, 60], reads
    assert reads[1, 60] > reads[1, 20]  # the counter does see per-step reads when they happen


def test_checkpoints_hold_what_training_changes_and_load_back():
    from pokesprite.train.loop import load_trained_state, trained_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # a frozen part, rebuilt by the stage itself
    state = trained_state(model)
    assert set(state) == set(model.state_dict()) - {"0.weight", "0.bias"}  # buffers stay: they may change
    other = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    other[0].load_state_dict(model[0].state_dict())
    other[0].requires_grad_(False)
    load_trained_state(other, state, "x.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    load_trained_state(other, model.state_dict(), "x.pt")  # a whole state dict, as older checkpoints hold
    with pytest.raises(ValueError, match=r"x.pt: its weights do not fit this model \(missing \['2.bias'\]"):
        load_trained_state(other, {k: v for k, v in state.items() if k != "2.bias"}, "x.pt")
    with pytest.raises(ValueError, match=r"unexpected \['3.weight'\]"):
        load_trained_state(other, {**state, "3.weight": torch.zeros(1)}, "x.pt")


def test_shard_gives_each_process_its_own_equal_rows_and_check_batch_refuses_uneven(monkeypatch):
    """distributed.shard under 3 processes: rank r gets rows [r*n/3, (r+1)*n/3), the ranks' shards
    tile the global batch; an uneven batch is refused (checked without starting processes)."""
    from pokesprite.train import distributed

    x = torch.arange(12)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(x))
    assert [len(p) for p in parts] == [4, 4, 4]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="does not split evenly"):
        distributed.shard(torch.arange(10))
    with pytest.raises(ValueError, match=r"multiple of the number of processes \(3\), got 10"):
        distributed.check_batch(10, "vae.train.batch_size")
    distributed.check_batch(12, "vae.train.batch_size")


def test_a_run_shortened_by_its_time_budget_resumes_to_the_shortened_end(tmp_path, monkeypatch):
    """The epochs that max_minutes left are part of the training state: a resumed run ends where the
    shortened run ended, with the one-cycle schedule it was re-fitted to (not cfg.epochs)."""
    from pokesprite.train import loop

    clock = {"t": 0.0}

    def fake_clock():  # 20 s per epoch: 3 of the 10 fit a minute
        clock["t"] += 20.0
        return clock["t"]

    monkeypatch.setattr(loop.time, "perf_counter", fake_clock)
    budget = cfg(epochs=10, max_minutes=1.0)
    straight = fit(toy_stage(), budget, out_dir=tmp_path / "a")
    assert len(straight.history) == 3
    monkeypatch.undo()  # the real clock: the resumed epoch is far within the budget
    resumed = fit(toy_stage(), budget, out_dir=tmp_path / "b", resume=tmp_path / "a" / "epoch_0002.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["lr"] < 1e-3 * budget.lr  # annealed at the shortened end
