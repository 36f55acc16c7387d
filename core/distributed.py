"""Process-group helpers: the one place that knows about ranks.

A plain `python main.py train ...` is world size 1; under `torchrun` the environment variables RANK,
WORLD_SIZE and LOCAL_RANK describe the job. Every helper is a no-op for a single process.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import DeviceError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name, local_rank=0, world_size=1):
    """trainer.device -> torch.device. "auto" is cuda when available; under torchrun each process
    takes the GPU of its LOCAL_RANK."""
    name = str(name).lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise DeviceError(f"trainer.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"trainer.device: {name!r} was asked for but CUDA is not available here")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"trainer.device: {name!r} is not a valid device") from None
    if world_size > 1:
        if device.index is not None:
            raise DeviceError(f"trainer.device: {name!r} names one GPU, but {world_size} processes run; "
                             "use cuda or auto (each process takes the GPU of its LOCAL_RANK)")
        device = torch.device("cuda", local_rank)
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"trainer.device: {device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return device


def init(device_name="auto"):
    """Join the process group described by the torchrun environment (nccl on CUDA, gloo on CPU)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world_size, local_rank, device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum of `tensor` over all processes (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor):
    """Maximum of `tensor` over all processes, e.g. whether any rank asked to stop."""
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every process (any picklable value)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
