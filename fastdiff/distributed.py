"""Data-parallel training across processes: torchrun + DistributedDataParallel.

``torchrun --nproc-per-node N -m fastdiff train ...`` (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) makes ``train`` initialise a process
group -- NCCL on GPUs, gloo on CPUs -- and train one replica per process:

* ``batch_size`` is per process (the global batch is batch_size x world size);
* each rank draws its own data order, t and noise (seeds offset by the rank);
* gradients are averaged by DDP, so every rank holds the same weights and EMA;
* only rank 0 writes: metrics, checkpoints (holding every rank's RNG and data state, so
  resume is exact for the same world size) and sample grids.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import FastDiffError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group the environment describes (if any) and pick this rank's device.

    Without WORLD_SIZE > 1 (and no group already initialised) this is a no-op returning
    rank 0 of 1 and ``device`` unchanged.  On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (world <= 1 and not dist.is_initialized()):
        return DistInfo(), device
    global _created_group, _joined
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        _created_group = True
    _joined = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank), device


#: Whether ``setup`` created the default process group (one the caller made is theirs).
_created_group = False
#: Whether this process ever trained in a process group (see ``exit_process``).
_joined = False


def teardown() -> None:
    """Destroy the process group ``setup`` created, if it still exists.

    ``train`` calls this when it raises (a signal, an output error: the process is about to
    end) and the CLI before it exits; a successful ``train()`` leaves the group to its caller.
    A group left to the exit-time destructors can abort the process ("terminate called
    without an active exception") when a peer rank has already gone.
    """
    global _created_group
    if _created_group and dist.is_initialized():
        _host_groups.clear()
        dist.destroy_process_group()
    _created_group = False


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through: DDP across ranks, else the model itself."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_across_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean of ``values`` over all ranks (a collective: call it on every rank)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world
    return values


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); [obj] when not distributed."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


_host_groups: dict[int, object] = {}


def host_group(info: DistInfo):
    """The process group for small host-side agreements (stop, checkpoint now, a write
    failed): the default group when it is gloo, else a gloo group made once per default group.
    Its collectives run on CPU tensors, so they never wait for the GPU.  Under NCCL creating
    it is a collective: every rank must make the first call at the same point."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _host_groups:
        _host_groups[key] = dist.new_group(backend="gloo")
    return _host_groups[key]


def max_across_ranks(values, info: DistInfo) -> list[int]:
    """Element-wise max of a few ints over all ranks (a collective; one gloo all-reduce of a
    CPU tensor, no device synchronisation); ``values`` itself when not distributed."""
    values = [int(v) for v in values]
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group(info))
    return t.tolist()


def broadcast_from_main(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable) on every rank (a collective); ``obj`` when not distributed."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=host_group(info))
    return box[0]


def raise_together(error: BaseException | None, info: DistInfo) -> None:
    """After a step of the set-up that may fail on one rank alone (rank 0's FID monitor: its
    data check, its Inception file), every rank learns whether any failed (a collective, on
    the host group): the failed rank raises its own ``error``, the others a FastDiffError
    naming it.  Otherwise a rank that failed alone before DDP is built would leave the others
    in DDP's first broadcast until the NCCL timeout."""
    if not info.enabled:
        if error is not None:
            raise error
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    said: list = [None] * info.world
    dist.all_gather_object(said, mine, group=host_group(info))
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(said) if text is not None]
    if failed:
        rank, text = failed[0]
        raise FastDiffError(f"rank {rank} failed while setting up the run ({text}); stopping")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def exit_process(status: int):
    """End the process with exit status ``status`` (the command line's last act).

    After training in a process group, destroy it (``teardown``), flush stdout and stderr,
    and leave by ``os._exit``, skipping the interpreter's exit-time C++ destructors: with gloo
    they can abort a process whose work is done and saved ("terminate called without an
    active exception" from a thread object destroyed while joinable, pytorch/pytorch#190489).
    Seen here about once in 30 two-rank SIGTERM stops, on either rank, even after
    destroy_process_group.  Otherwise an ordinary ``sys.exit``.
    """
    if _joined:
        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
