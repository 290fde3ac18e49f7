"""Data-parallel training over the processes ``torchrun`` starts (one per GPU, or several on a CPU).

Every process holds the whole model and the whole (small) dataset. Each step, every process takes
the same global batch (the stage's seeded generator shuffles identically everywhere), draws the
batch's random numbers (augmentation, noise, timesteps, dropped captions) for the *global* batch
from the identically seeded default generator, and keeps its own rows (``shard``) for the
expensive forward and backward passes. ``DistributedDataParallel`` averages the gradients, so with
equal shards a step is the step one process takes on the global batch: the config's batch size and
learning rate mean the same whatever the number of processes, and a checkpoint written under N
processes resumes under any other N. Losses that couple the rows of a batch see the global batch:
contrastive losses gather the embeddings (``gather``), the VAE's free-bits floor and the adaptive
adversarial weight average their statistics (``mean``).

Process 0 writes checkpoints, MLflow, TensorBoard and metrics; the others only train. Outside
``torchrun`` (``WORLD_SIZE`` unset) every function here is the single-process identity.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import zlib

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Process 0 (or the only process): the one that writes files and logs."""
    return rank() == 0


def local_device() -> torch.device | None:
    """This process's GPU under ``torchrun`` (cuda:$LOCAL_RANK), or None when not launched or no GPU."""
    if launched() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def setup(device: str | torch.device) -> None:
    """Join the process group ``torchrun`` describes (once per process): NCCL on CUDA, gloo on the CPU."""
    if not launched() or dist.is_initialized():
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))


def check_batch(batch_size: int, key: str) -> None:
    """Each process must get an equal share of every batch."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"{key} must be a multiple of the number of processes ({n}), got {batch_size}: "
                         "every process takes an equal share of each batch")


def shard(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch (all of it in one process)."""
    n = world_size()
    if n == 1:
        return x
    if len(x) % n:
        raise ValueError(f"a batch of {len(x)} does not split evenly over {n} processes")
    size = len(x) // n
    return x[rank() * size:(rank() + 1) * size]


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the processes (no gradient); ``x`` itself in one process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def mean_scalars(scalars: dict) -> dict[str, torch.Tensor]:
    """Each 0-d value averaged over the processes, in one collective: what one process would log."""
    if world_size() == 1:
        return scalars
    device = next((v.device for v in scalars.values() if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach() for v in scalars.values()])
    return dict(zip(scalars, mean(stacked).unbind()))


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order, with gradients flowing back to each process's
    own rows (summed over the processes' losses, so that DDP's average is the one-process gradient)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def average_gradients(params) -> None:
    """Average ``.grad`` over the processes by hand, for a model trained outside ``wrap`` (a discriminator)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


@contextlib.contextmanager
def private_rng(device: str | torch.device):
    """Random draws inside (a dropout layer's masks) that differ between processes, without moving the
    shared default generator: every process leaves it where it was, so all of them keep drawing the
    global batch's random numbers alike. The private stream is seeded from the shared state and the
    rank (deterministic, and resumed with the checkpointed state). A no-op in one process."""
    if world_size() == 1:
        yield
        return
    device = torch.device(device)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(state.numpy().tobytes()) * 1009 + rank())
        yield


def broadcast(value):
    """Process 0's ``value`` (any picklable object), in every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)`` when launched by ``torchrun``, else ``module`` itself."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
