"""What every stage trainer shares: seeding, the optimiser and its step, autocast."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on the CPU and CUDA: it can also skip a step
    without a host sync (``optimizer_step``)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_step(opt: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Step unless ``ok`` (a 0-d device bool) is false. The fused optimiser reads the flag on the device
    (the same ``found_inf`` mechanism AMP's GradScaler uses: no update, step counts unchanged); any
    other optimiser falls back to reading it on the host."""
    if opt.defaults.get("fused"):
        opt.found_inf = (~ok).float()
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif bool(ok):
        opt.step()


def autocast(device: str | torch.device, precision: str):
    """bf16 autocast of the forward pass when ``precision`` is bf16 (weights stay fp32), else a no-op."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
