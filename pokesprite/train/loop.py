"""The epoch loop every stage shares: AdamW + OneCycleLR, the stability guard, EMA, checkpoints, resume.

A stage supplies what is particular to it as plain functions (``Stage``): how to compute a batch's
loss, how to build an epoch's batches, how to validate, and what inference weights to export. ``fit``
does the rest, identically for all three stages:

- AdamW (weight decay from the config) with a one-cycle schedule: ``warmup_frac`` of all steps
  warming up, then cosine annealing (the seed's OneCycleLR with 10% warm-up);
- per batch: skip a non-finite loss, back-propagate, skip a non-finite gradient, clip adaptively
  (``StabilityGuard``), step, update the EMA; log loss, learning rate and gradient norm per step;
- per epoch: validate, log, write ``last.pt`` (every ``save_every`` epochs, default every epoch, and
  after the last), ``epoch_NNNN.pt`` (every ``checkpoint_every`` epochs) and ``best.pt`` (the epoch
  with the best monitored validation metric; with ``save_every`` > 1 it is held in memory and written
  at the next save, which keeps sub-second GPU epochs from waiting on the disk).

``last.pt`` and ``epoch_NNNN.pt`` are training checkpoints: the model, optimiser, LR-scheduler, EMA
and guard state, the epoch, the RNG states training draws from, the stage's config and the history,
so ``fit(..., resume=path)`` continues exactly where one was written (on the CPU, 2 epochs straight
and 1 + resume + 1 give identical weights). ``best.pt`` holds the stage's inference weights (``Stage.export``) with
the configs and history, and no training state. Each file holds each set of weights once: the
exported state dicts, which the training state can make again, stay out of the training checkpoints.

Under ``torchrun`` (``pokesprite.train.distributed``) the step runs through DistributedDataParallel:
each process computes its share of every global batch, gradients are averaged, the logged scalars
are the global batch's, and process 0 alone writes checkpoints, logs and sample grids. Every process
validates (the same weights give the same numbers) and so agrees on the best epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from pokesprite.config import TrainConfig, to_dict
from pokesprite.progress import progress
from pokesprite.tracking import Tracker
from pokesprite.checkpoints import atomic_save, load_checkpoint
from pokesprite.train import distributed
from pokesprite.train.common import autocast, make_optimizer, optimizer_step
from pokesprite.train.ema import EMA
from pokesprite.train.stability import StabilityGuard

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """What ``fit`` needs to know about one stage."""
    name: str  # "vae", "diffusion", "finetune": checkpoint kind and log prefix
    model: nn.Module  # everything that trains (and whose state is checkpointed)
    loss: Callable[[object, int], tuple[torch.Tensor, dict]]  # (batch, epoch) -> (loss, extra scalars)
    batches: Callable[[int], Iterable]  # epoch -> its batches (shuffled with the stage's generator)
    validate: Callable[[int], dict]  # epoch -> validation metrics (must contain ``monitor``)
    export: Callable[[], dict]  # inference weights + configs for best.pt / last.pt (merged into them)
    generator: torch.Generator  # the stage's seeded generator (shuffling, noise); checkpointed
    steps_per_epoch: int
    monitor: str = "val_loss"  # lower is better
    ema_decay: float = 0.0  # > 0: keep an EMA of ``model``; validation and export see the EMA weights
    on_epoch_end: Callable[[int, dict], None] | None = None  # e.g. log a sample grid
    config: dict = field(default_factory=dict)  # stage config stored in every checkpoint
    device: torch.device = torch.device("cpu")  # where the model trains (autocast, the guard's counters)
    # State that trains beside ``model`` by its own rules (e.g. a discriminator and its optimiser), for
    # exact resume: saved in every checkpoint's training state and handed back on resume.
    extra_state: Callable[[], dict] | None = None
    load_extra_state: Callable[[dict], None] | None = None


class StageStep(nn.Module):
    """``Stage.loss`` as a module whose parameters are the stage's model, so that DistributedDataParallel
    sees one forward per step (and the loss function keeps calling the model's own methods)."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.model = stage.model
        self.loss = stage.loss

    def forward(self, batch, epoch: int):
        return self.loss(batch, epoch)


def rng_state(generator: torch.Generator) -> dict:
    """The random states training draws from: torch's (CPU and CUDA), numpy's and the stage's generator.

    Python's ``random`` is left out: training draws nothing from it, while libraries beside it do, a
    varying number of times (MLflow's random run names), so its state would only make the checkpoints
    of two identical runs differ."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain data: checkpoints load weights_only
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "python" in state:  # written by earlier versions
        random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int, epochs: int | None = None):
    """OneCycleLR: ``warmup_frac`` of the steps from lr/25 up to lr, then cosine down to ~0.

    OneCycleLR divides by ``warmup_frac * total - 1``, so a warm-up of exactly one step (10 steps at
    0.1) raises ZeroDivisionError; that warm-up is its first step at lr/25, which a hair more keeps."""
    total = max(1, (epochs or cfg.epochs) * steps_per_epoch)
    pct = cfg.warmup_frac if float(cfg.warmup_frac * total) != 1.0 else (1 + 1e-3) / total
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct,
                                               anneal_strategy="cos", cycle_momentum=False)


def epochs_within_budget(cfg: TrainConfig, elapsed: float, epoch_seconds: float, done: int) -> int:
    """How many epochs fit ``cfg.max_minutes``: the ``done`` ones, which took ``elapsed`` seconds, and as
    many more of ``epoch_seconds`` as the rest holds (at least ``done``, at most ``cfg.epochs``)."""
    if cfg.max_minutes <= 0 or epoch_seconds <= 0:
        return cfg.epochs
    more = int(max(cfg.max_minutes * 60 - elapsed, 0.0) // epoch_seconds)
    return max(done, min(cfg.epochs, done + more))


class EpochSums:
    """Per-epoch sums of the step scalars over the batches that were taken, kept on the device."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.taken = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.norm_max = torch.full((), -math.inf, device=device)

    def add(self, scalars: dict, norm: torch.Tensor, ok: torch.Tensor) -> None:
        okf = ok.float()
        for k, v in scalars.items():
            v = torch.as_tensor(v, dtype=torch.float32).detach().to(self.device)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v, torch.zeros_like(v))
        self.taken += okf
        self.norm_sum += torch.where(ok, norm, torch.zeros_like(norm))
        self.norm_max = torch.where(ok, torch.maximum(self.norm_max, norm), self.norm_max)

    def means(self) -> dict[str, float]:
        taken = float(self.taken)
        out = {f"train_{k}": float(v) / max(taken, 1) for k, v in self.sums.items()}
        out["grad_norm_mean"] = float(self.norm_sum) / taken if taken else float("nan")
        out["grad_norm_max"] = float(self.norm_max) if taken else float("nan")
        return out


@dataclass
class FitResult:
    history: list[dict]
    best: float
    best_epoch: int
    skipped_batches: int
    explosions: int


def fit(stage: Stage, cfg: TrainConfig, *, out_dir: Path, tracker: Tracker | None = None,
        resume: Path | None = None) -> FitResult:
    """Train ``stage`` for ``cfg.epochs`` epochs (or the rest of them, from ``resume``)."""
    main = distributed.is_main()
    tracker = tracker if tracker is not None and main else Tracker()
    out_dir = Path(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_batch(cfg.batch_size, f"{stage.name}.train.batch_size")
    step_fn = distributed.wrap(StageStep(stage))  # the stage's loss (through DDP under torchrun)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, cfg, stage.steps_per_epoch)
    guard = StabilityGuard(cfg, stage.name, stage.device)
    ema = EMA(stage.model, stage.ema_decay) if stage.ema_decay > 0 else None
    history: list[dict] = []
    best, best_epoch, start = math.inf, 0, 1
    epochs = cfg.epochs  # may shrink to fit cfg.max_minutes

    if resume is not None:
        ckpt = load_checkpoint(resume, stage.name)
        if "train" not in ckpt:
            raise ValueError(f"{resume}: holds inference weights only; resume from last.pt or epoch_NNNN.pt")
        state = ckpt["train"]
        load_trained_state(stage.model, state["model"], str(resume))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        guard.load_state_dict(state["guard"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
        set_rng_state(state["rng"], stage.generator)
        if stage.load_extra_state is not None and state.get("extra") is not None:
            stage.load_extra_state(state["extra"])
        start = state["epoch"] + 1
        epochs = state.get("epochs", cfg.epochs)
        log.info("%s: resuming from %s after epoch %d of %d", stage.name, resume, state["epoch"], epochs)
        if main:
            best, best_epoch = keep_best(out_dir, Path(resume).parent, stage.name, best, best_epoch)

    def weights_file(epoch: int, exported: dict) -> dict:
        """best.pt: the inference weights and configs."""
        return {"kind": stage.name, **exported, "epoch": epoch, "history": list(history),
                "train_config": to_dict(cfg), "stage_config": stage.config}

    def training_file(epoch: int, exported: dict) -> dict:
        """last.pt / epoch_NNNN.pt: the training state, and the export's settings without its weights."""
        settings = {k: v for k, v in exported.items() if not is_state_dict(v)}
        return {**weights_file(epoch, settings),
                "train": {"model": trained_state(stage.model), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "guard": guard.state_dict(),
                          "ema": ema.state_dict() if ema else None, "epoch": epoch, "epochs": epochs,
                          "history": history, "best": best, "best_epoch": best_epoch, "rng": rng_state(stage.generator),
                          "extra": stage.extra_state() if stage.extra_state is not None else None}}

    step = (start - 1) * stage.steps_per_epoch
    bar = progress(None, desc=f"{stage.name} epochs", initial=start - 1, total=epochs)
    epoch, started = start - 1, time.perf_counter()
    epoch_began = started
    pending_best = None
    while epoch < epochs:
        epoch += 1
        stage.model.train()
        sums = EpochSums(guard.device)
        skipped_before, explosions_before = guard.skipped, guard.explosions
        for batch in progress(stage.batches(epoch), desc=f"epoch {epoch}", leave=False,
                              total=stage.steps_per_epoch):
            with autocast(stage.device, cfg.precision):
                loss, extra = step_fn(batch, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            scalars = distributed.mean_scalars({"loss": loss.detach(), **extra})  # the global batch's
            norm, ok = guard.step(scalars["loss"], params)
            optimizer_step(opt, ok)
            sched.step()
            if ema is not None:
                ema.update(stage.model, ok)
            step += 1
            sums.add(scalars, norm, ok)
            if step % cfg.log_every == 0:  # the only host reads inside the epoch
                guard.check()
                tracker.log_step({**{f"train/{k}": float(v) for k, v in scalars.items()},
                                  "train/lr": sched.get_last_lr()[0], "train/grad_norm": float(norm)}, step)
        guard.check()

        metrics = sums.means()
        metrics.update({"lr": sched.get_last_lr()[0],
                        "skipped_batches": guard.skipped - skipped_before,
                        "grad_explosions": guard.explosions - explosions_before})
        with ema.averaged(stage.model) if ema is not None else contextlib.nullcontext():
            with autocast(stage.device, cfg.precision):
                metrics.update(stage.validate(epoch))
            if stage.monitor not in metrics:
                raise KeyError(f"{stage.name}: validation returned no {stage.monitor!r}")
            improved = metrics[stage.monitor] < best
            if improved:
                best, best_epoch = metrics[stage.monitor], epoch
            history.append({"epoch": epoch, **metrics})
            tracker.log_metrics(metrics, step=epoch)
            log.info("%s epoch %d/%d: %s", stage.name, epoch, epochs,
                     {k: round(v, 4) for k, v in metrics.items()})
            if stage.on_epoch_end is not None and main:
                stage.on_epoch_end(epoch, metrics)
            # copies: the EMA context swaps weights back on exit
            exported = clone_tensors(stage.export()) if main else {}
        bar.update(1)
        now = time.perf_counter()
        # The time budget: the second epoch's time decides (the first one also pays for warm-up:
        # kernel selection, lazy initialisation, caches), unless the first alone used up the budget.
        # Process 0's clock decides for every process.
        if cfg.max_minutes > 0 and epoch in (start, start + 1):
            decides = epoch == start + 1 or now - started >= cfg.max_minutes * 60
            fitting = epochs_within_budget(cfg, now - started, now - epoch_began, epoch) if decides else epochs
            fitting = distributed.broadcast(fitting)
            if fitting < epochs:
                log.warning("%s: %d epochs do not fit max_minutes=%g at %.2f s per epoch; training %d",
                            stage.name, epochs, cfg.max_minutes, now - epoch_began, fitting)
                epochs = fitting
                sched = refit_scheduler(opt, cfg, stage.steps_per_epoch, epochs, step)
                bar.total = epochs
        epoch_began = now
        flush = cfg.save_every <= 1 or epoch % cfg.save_every == 0 or epoch == epochs
        if not main:  # process 0 writes
            continue
        if improved:
            pending_best = weights_file(epoch, exported)  # exported: copies already; held until the next flush
        periodic = bool(cfg.checkpoint_every) and epoch % cfg.checkpoint_every == 0
        if flush or periodic:
            ckpt = training_file(epoch, exported)
            if pending_best is not None:  # before any file that names it as the best epoch
                atomic_save(pending_best, out_dir / "best.pt")
                pending_best = None
        if flush:
            atomic_save(ckpt, out_dir / "last.pt")
        if periodic:
            atomic_save(ckpt, out_dir / f"epoch_{epoch:04d}.pt")
    bar.close()

    return FitResult(history, best, best_epoch, guard.skipped, guard.explosions)


def keep_best(out_dir: Path, resumed_from: Path, kind: str, best: float, best_epoch: int) -> tuple[float, int]:
    """A resumed run needs the weights of the epoch its state calls best: ``out_dir/best.pt`` when it
    holds that epoch, else the one beside the file it resumed from (copied into ``out_dir``). Without
    either (a best.pt overwritten by later epochs than the resumed file's), the best so far is
    forgotten with a warning, and the next validation writes best.pt."""
    if best_epoch == 0:
        return best, best_epoch
    target = out_dir / "best.pt"
    for candidate in dict.fromkeys((target, resumed_from / "best.pt")):
        if candidate.is_file():
            weights = load_checkpoint(candidate, kind)
            if weights.get("epoch") == best_epoch:
                if candidate != target:
                    atomic_save(weights, target)
                return best, best_epoch
    folders = " or ".join(dict.fromkeys(str(p) for p in (out_dir, resumed_from)))  # one folder when they agree
    log.warning("%s: no best.pt of epoch %d (the best so far) in %s; best.pt will be the best epoch from here on",
                kind, best_epoch, folders)
    return math.inf, 0


def refit_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int, epochs: int, steps_done: int):
    """A one-cycle schedule over ``epochs`` epochs, advanced past the ``steps_done`` already taken."""
    for group in opt.param_groups:  # OneCycleLR (re)derives its lr range from these on construction
        group.pop("initial_lr", None), group.pop("max_lr", None), group.pop("min_lr", None)
    sched = make_scheduler(opt, cfg, steps_per_epoch, epochs)
    for _ in range(min(steps_done, sched.total_steps)):
        sched.step()
    return sched


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without its frozen parameters (``requires_grad`` false): what training
    can change. A checkpoint holds only this; the frozen weights come from building the model again
    (a fine-tuned text encoder's lower layers, from the bundled package), so they are stored once."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a ``trained_state`` (or a whole state dict, as older checkpoints hold) into ``model``; a
    missing entry must be a frozen parameter, and nothing may be left over."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise ValueError(f"{where}: its weights do not fit this model (missing {sorted(set(missing) - frozen)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); was it trained with other settings?")


def is_state_dict(value) -> bool:
    """A module's weights: a non-empty dict of tensors."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def clone_tensors(obj):
    """Deep copy of the tensors in a nested dict/list (other values are shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, clone_tensors(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tensors(v) for v in obj)
    return obj
