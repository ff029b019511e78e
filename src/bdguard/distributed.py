"""Data-parallel training under torchrun: which process this is, and the few collective steps a training loop
needs. Without torchrun (no WORLD_SIZE in the environment) every function is the one-process identity, so the
loops call them unconditionally.

Every rank holds the whole data set and draws the same shuffle and augmentation numbers from the same seeded
generator; each trains on its contiguous share of every global batch, and the loss is scaled so that
DistributedDataParallel's average of the ranks' gradients is the gradient of the global batch's mean loss. The
global batch size and the lr therefore mean what they mean in one process. BatchNorm statistics are each rank's
own share's (SyncBatchNorm needs a GPU), the one source of difference from a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist

from bdguard.errors import BdguardError


def launched() -> bool:
    """Whether torchrun (or any launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def environment_rank() -> int:
    """This process's rank as the launcher set it (0 without one); readable before the group starts."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The one process that writes files and prints."""
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA) and return this rank's device: its own GPU
    (LOCAL_RANK) on CUDA, the CPU otherwise. Without a launcher: `device` as it is."""
    if not launched():
        return device
    if device.type not in ("cpu", "cuda"):
        raise BdguardError(f"torchrun trains on CPU (gloo) or CUDA (NCCL), not on {device.type}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when several ranks train it (it shares the parameters: the plain model
    stays the one to evaluate and save), else `model` itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def split(batch: int) -> tuple[slice, float]:
    """This rank's contiguous part of a global batch of `batch` items (the first ranks take one more when it does
    not divide), and the factor on the part's mean loss that makes the ranks' averaged gradient the gradient of the
    whole batch's mean loss. A batch smaller than the number of ranks is not split: each rank takes all of it, with
    factor 1 (its loss then counts once per rank in an epoch's reported mean). One process: (everything, 1.0)."""
    ranks = world()
    if ranks == 1 or batch < ranks:
        return slice(None), 1.0
    part = part_of(batch)
    return part, (part.stop - part.start) * ranks / batch


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks, in place."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def sync_buffers(model: torch.nn.Module) -> None:
    """The main rank's buffers (BatchNorm's running statistics above all) on every rank, so that an eval-mode pass
    gives the same answer everywhere: every rank then takes the same decisions from it."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def own_generator(generator: torch.Generator) -> torch.Generator:
    """A generator for draws whose size depends on this rank's share (which would put the shared `generator` out of
    step with the other ranks'): `generator` itself in one process, a per-rank one derived from it otherwise."""
    if not active():
        return generator
    seed = (generator.initial_seed() + 7_919 * (rank() + 1)) % 2**63
    return torch.Generator(device=generator.device).manual_seed(seed)


def part_of(n: int) -> slice:
    """This rank's contiguous part of n items for a pass whose results are gathered (the first ranks take one more
    when it does not divide; a rank may get none)."""
    base, extra = divmod(n, world())
    me = rank()
    begin = me * base + min(me, extra)
    return slice(begin, begin + base + (me < extra))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors (each its `part_of` a whole, in rank order) concatenated along the first dimension."""
    if not active():
        return tensor
    if tensor.dtype == torch.bool:  # not every backend gathers booleans
        return gather(tensor.to(torch.uint8)).bool()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    largest = int(max(size.item() for size in sizes))
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)])


@contextmanager
def main_first() -> Iterator[None]:
    """The main rank runs the block first (decoding, poisoning and caching the data set), then the others, which
    then read what it cached."""
    if active() and not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank is gone (it failed, or was stopped)."""
    if not active() or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(word in text for word in ("gloo", "NCCL"))


def finish() -> None:
    """Every rank waits here for the others after a command that succeeded: a rank that tore the process group down
    while the main one was still evaluating and writing aborted in the teardown now and then (gloo, "terminate
    called without an active exception"), and the launcher then stopped the whole job."""
    if active():
        dist.barrier()


def stop() -> None:
    """Leave the process group (a no-op without one). After a lost peer the teardown itself may fail; the
    process is ending then, with its error already said."""
    if dist.is_available() and dist.is_initialized():
        with suppress(RuntimeError):
            dist.destroy_process_group()
