"""Data-parallel training across processes, in plain ``torch.distributed``.

Launch with torchrun (one process per GPU, or several CPU processes with gloo)::

    torchrun --nproc_per_node=2 -m selfsup pretrain --method simclr --data PATH --out RUN_DIR

``train.batch_size`` stays the *global* batch: each of the W processes takes its contiguous slice of
every batch (``batch_size / W`` images), so a run on W processes sees the same images per step as a
run on one. Gradients are averaged across processes after each backward pass
(:func:`sync_gradients`: one flattened all-reduce; the explicit form of what DDP does, which also
works for methods whose forward is not ``Module.__call__``). Rank 0 alone writes checkpoints,
``metrics.csv`` and figures.

Losses that couple the samples of a batch (contrastive negatives, cross-correlation and covariance
statistics, Sinkhorn, centring) must see the global batch. They call :func:`gather`, an all-gather
*with gradients*: its backward sums the incoming gradients over all processes (all-reduce) and
returns this process's slice. With that rule, each process computes a loss ``L_r`` whose mean over
processes is the single-process loss of the global batch (the same ``L`` on every process for
Barlow Twins / VICReg, the local anchors' share for SimCLR), and the averaged gradients equal the
single-process gradients. ``tests/test_distributed.py`` checks it against one process with twice
the batch. Omitting the all-reduce in the backward (returning only the local gradient slice) is the
bug that lightly (issues #1528, #1920, #1977) and sthalles/SimCLR (#59) shipped: gradients that flow
into other processes' copies of an embedding are lost.

Batch norm: per-process batch statistics differ from global ones by design; ``train.sync_bn=true``
converts the model's BatchNorm layers to ``SyncBatchNorm`` (needs CUDA).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_with_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[int, int, str]:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``): NCCL on CUDA, gloo on CPU.
    Returns ``(rank, world_size, device)`` where ``device`` is ``cuda:LOCAL_RANK`` for CUDA runs."""
    if not launched_with_torchrun():
        return 0, 1, device
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward all-reduces (sums) the gradient and keeps this
    process's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch: ``x`` of every process concatenated along dim 0 in rank order, with
    gradients flowing back to each process's own slice. The identity in a single process."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def sync_gradients(params) -> None:
    """Average the gradients of ``params`` over processes (one all-reduce of a flat buffer)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every process (in place; ``t`` on the process's device for NCCL)."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process."""
    for t in list(module.parameters()) + list(module.buffers()):
        broadcast(t.data)


def any_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process if ``flag`` is true on any (keeps processes stepping in lockstep when one
    of them sees a signal or a non-finite loss)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
