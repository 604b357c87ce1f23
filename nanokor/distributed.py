"""Process groups and collectives: everything about running on more than one process.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts NCCL on
CUDA or gloo on CPU; without it the run is a single process, and every collective below is then the
identity, so callers never ask whether they are distributed. How a model trains across processes is
the engines' business (nanokor/engine.py).
"""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanokor.errors import ConfigError


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", single_process_group: bool = False) -> Env:
    """Join torchrun's process group, or stay a single process.

    single_process_group: start a world of one when torchrun is absent (DeepSpeed always needs a group).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for, but PyTorch sees no CUDA GPU. Use --device=cpu (or auto), "
                          "or install a CUDA build of PyTorch.")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if single_process_group and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if "RANK" not in os.environ:
        return Env(0, 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", device_id=torch_device)
    else:
        torch_device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Env(rank, local_rank, world_size, torch_device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_from_master(t: torch.Tensor) -> torch.Tensor:
    """t, as rank 0 has it, on every rank (in place)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


def gather_objects(obj) -> list:
    """obj from every rank, in rank order (on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
