"""Process-group helpers. The only module that imports torch.distributed.

Every helper is a no-op at world size 1, so single-process code calls them unconditionally.
`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_from_env``
joins that group (NCCL on CUDA, gloo on the CPU):

    torchrun --nproc-per-node 8 -m byol pretrain --config imagenet_resnet50_300ep data.path=...
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that writes logs and checkpoints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init_from_env(device_type: str) -> None:
    """Join the process group torchrun described in the environment (no-op for one process or
    when already joined). On CUDA each process takes the GPU of its LOCAL_RANK."""
    if is_initialized() or not launched_by_torchrun():
        return
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every batch norm of ``model`` as a SyncBatchNorm. A timm model's fused norm + activation
    layers (BatchNormAct2d) go through timm's converter: torch's would turn them into a plain
    SyncBatchNorm that drops the activation."""
    if any(type(m).__module__.startswith("timm.") for m in model.modules()):
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable (online) parameters; the target network has no
    gradients, so DDP leaves it alone and every rank updates it with the same EMA. On CUDA,
    batch norm becomes SyncBatchNorm (cross-replica statistics, as the paper's TPU pods); on the
    CPU (gloo) it stays per-process. Returns ``model`` itself at world size 1."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ranks of scalar tensors (one collective for all of them); identity at size 1."""
    if world_size() == 1 or not values:
        return values
    keys = list(values)
    stacked = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(stacked)
    stacked /= world_size()
    return dict(zip(keys, stacked.unbind()))


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[b, D] on each rank -> ([world * b, D] in rank order, this rank's row offset): the
    negatives of every rank's batch (docs/method.md §7 under DDP). Differentiable: the gradient of each
    rank's loss flows back to the rank that computed the rows. (x, 0) at world size 1."""
    if world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous())), rank() * len(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world * b, ...] in rank order, no gradient (e.g. the keys that
    every rank appends to its MoCo queue, so the queues stay identical). x at world size 1."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory named from rank 0's clock)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (e.g. a SIGTERM that reached one process):
    ranks must stop at the same step or the next collective waits forever."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: the process's GPU under NCCL (which has no
    CPU path), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small objects: lists of records)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
