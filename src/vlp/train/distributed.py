"""Data-parallel training on PyTorch's own engine: ``torchrun`` processes, DDP or FSDP2.

One process per device, started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT):

    torchrun --standalone --nproc_per_node 8 -m vlp.cli train ...               # one node
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint host0:29500 -m vlp.cli train ...    # per node

Under SLURM without torchrun (``srun python -m vlp train ...``, one task per device), the same
variables come from SLURM's (`slurm_launch_env`). Without either, everything here is a no-op
and training runs in one process.
Contrastive features cross ranks through `GatherExchange`; checkpoints are full (unsharded)
state dicts written by rank 0, so a run resumes on any world size.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlp.contract import PretrainModel
from vlp.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")
# tensor collectives under their newer names where this torch has them
_all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(name: str) -> torch.device:
    """The torch device `name` names, if this machine has it; ConfigError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={name!r}: not a device name; expected auto, cpu, cuda, "
                          "cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r}: no CUDA GPU is available here; use "
                              "device='cpu' (or 'auto')")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name!r}: this machine has {count} CUDA GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}: MPS is not available here; use device='cpu'")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r}: vlp runs on cpu, cuda or mps")
    return device


SLURM_DEFAULT_PORT_BASE = 20000  # MASTER_PORT under SLURM: this + job id % 10000


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-006,9],cpu1`` -> ``gpu003``."""
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    # each bracket group keeps its first choice; a range starts at its first number
    host = re.sub(r"\[([^,\]-]*)[^\]]*\]", lambda m: m.group(1), first)
    if not host:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: expected a SLURM host list "
                          "such as node[01-04]")
    return host


def slurm_launch_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from a SLURM task's
    environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
    SLURM_JOB_NODELIST, MASTER_PORT or a port from SLURM_JOB_ID); {} under torchrun (WORLD_SIZE
    set), outside SLURM, or for a one-task job. Variables already set win."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return {}
    try:
        world = int(environ.get("SLURM_NTASKS", "1"))
        rank, local = int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0"))
    except ValueError:
        raise ConfigError("SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID: expected integers, got "
                          f"{environ.get('SLURM_PROCID')!r}, {environ.get('SLURM_NTASKS')!r}, "
                          f"{environ.get('SLURM_LOCALID')!r}") from None
    if world <= 1:
        return {}
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} with SLURM_NTASKS={world}: expected 0 <= "
                          "SLURM_PROCID < SLURM_NTASKS")
    launch = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST"))
        if not nodelist:
            raise ConfigError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is not set; set "
                              "MASTER_ADDR to the first node's host name")
        launch["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in environ:
        job = environ.get("SLURM_JOB_ID", "0")
        launch["MASTER_PORT"] = str(SLURM_DEFAULT_PORT_BASE
                                    + (int(job) if job.isdigit() else 0) % 10000)
    return launch


def init_distributed(device: str = "auto", timeout_minutes: float = 30) -> tuple[DistEnv,
                                                                                   torch.device]:
    """Join the process group torchrun (or SLURM: `slurm_launch_env`) describes (NCCL on
    CUDA, gloo on CPU) and pick this rank's device; one process without either."""
    os.environ.update(slurm_launch_env(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return DistEnv(), check_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device={device!r} under torchrun or SLURM: expected 'auto', 'cuda' "
                          "or 'cpu' (each rank takes cuda:LOCAL_RANK)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=chosen if use_cuda else None)
    return DistEnv(rank, world_size, local_rank), chosen


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(tensor: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= env.world_size
    return tensor


def all_reduce_min(tensor: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """Every rank's (picklable) `value`, in rank order, on every rank."""
    if not env.distributed:
        return [value]
    values: list[Any] = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any, env: DistEnv) -> Any:
    """Rank 0's `value` on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# feature gathering


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows: each rank's
    loss depends on every rank's features."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_tensor(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        rows = grad.shape[0] // world
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((rows, *grad.shape[1:]))
            _reduce_scatter_tensor(mine, grad.contiguous())
            return mine
        summed = grad.contiguous().clone()  # gloo has no reduce-scatter: reduce all, keep ours
        dist.all_reduce(summed)
        return summed[rank * rows:(rank + 1) * rows]


def _all_gather(tensor: Tensor, with_grad: bool) -> Tensor:
    if with_grad:
        return _AllGatherWithGrad.apply(tensor)
    world, rank, rows = dist.get_world_size(), dist.get_rank(), tensor.shape[0]
    out = tensor.new_empty((world * rows, *tensor.shape[1:]))
    _all_gather_tensor(out, tensor.detach().contiguous())
    # our own rows keep their graph, so the local terms still train this rank's towers
    return torch.cat([out[:rank * rows], tensor, out[(rank + 1) * rows:]])


@dataclass(frozen=True)
class GatherExchange:
    """`vlp.losses.FeatureExchange` over the default process group.

    ``with_grad``: gradients flow back to the rank that made each feature, so one step equals
    one process on the concatenated batch (open_clip ``--gather-with-grad``); without it each
    rank's own rows get only its own loss terms. ``local_loss``: each rank scores its rows
    against the gathered batch (memory linear in world size) instead of the whole batch.
    Ranks may hold different row counts (skipped samples); rows are padded for the collective.
    """

    local_loss: bool = True
    with_grad: bool = True

    def gather(self, *features: Tensor) -> tuple[list[Tensor], int]:
        rank = dist.get_rank()
        rows = features[0].shape[0]
        counts = torch.tensor([rows], device=features[0].device)
        all_counts = counts.new_empty(dist.get_world_size())
        _all_gather_tensor(all_counts, counts)
        all_counts = all_counts.tolist()
        most = max(all_counts)
        gathered = []
        for tensor in features:
            padded = tensor
            if rows < most:
                padded = torch.cat([tensor, tensor.new_zeros((most - rows, *tensor.shape[1:]))])
            full = _all_gather(padded, self.with_grad)
            if min(all_counts) < most:  # drop the padding rows
                full = torch.cat([full[r * most:r * most + n] for r, n in enumerate(all_counts)])
            gathered.append(full)
        return gathered, sum(all_counts[:rank])


# ---------------------------------------------------------------------------------------------
# model wrapping and state


def wrap_model(model: PretrainModel, strategy: str, env: DistEnv, device: torch.device
               ) -> nn.Module:
    """DDP, or FSDP2 ``fully_shard`` per transformer block and at the root; unchanged in one
    process. The model must already be on `device` and hold identical weights on every rank."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}; expected one of {list(STRATEGIES)}")
    if not env.distributed:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 cannot shard 0-d parameters (logit_scale, logit_bias): they stay replicated and
    # `sync_replicated_grads` averages their gradients
    replicated = {param for param in model.parameters() if param.ndim == 0}
    for block in model.shard_units():
        fully_shard(block)
    fully_shard(model, ignored_params=replicated or None)
    model._vlp_replicated = sorted(replicated, key=id)
    for method in ("features", "loss"):  # called outside forward by the accumulation path
        register_fsdp_forward_method(model, method)
    return model


def sync_replicated_grads(model: nn.Module, env: DistEnv) -> None:
    """Average the gradients FSDP leaves alone (its ignored parameters) over ranks."""
    for param in getattr(model, "_vlp_replicated", ()):
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= env.world_size


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_grad_sync(model: nn.Module, skip: bool) -> Any:
    """Context that holds back the gradient all-reduce (accumulation micro-steps but the last)."""
    if not skip:
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(value: Tensor) -> Tensor:
    """A DTensor's full value (FSDP grad norms); other tensors as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
