"""The training loop: plain PyTorch, one readable function per concern.

What a run does (``pretrain``)::

    images  = decode cache of the data (uint8, memory-mapped)          # selfsup.data
    method  = METHODS[cfg.method](cfg)                                  # backbone + heads
    for step in range(start, total_steps):
        x     = next batch of uint8 images, in a seeded order per epoch, prefetched by a thread
        batch = method.prepare(x, generator(seed, step))                # views + pseudo labels, on device
        with autocast(precision): out = method.training_step(batch)     # forward + loss
        out["loss"].backward(); optimizer.step()                        # lr = warm-up + cosine
        log to metrics.csv every log_every steps; checkpoint every ckpt_every steps

Reproducibility and exact resume: every random choice is a function of ``(seed, step)`` (the
augmentation generator) or ``(seed, epoch)`` (the data order), so a run resumed from a checkpoint
replays the same batches with the same views and ends with the same weights as an uninterrupted
run. The checkpoint holds model, optimizer, step, elapsed time and the global RNG states; it is
written atomically (temporary file + ``os.replace``), keeps the one it replaces, and is loaded with
``weights_only=True`` and checked (``checkpoint.py``: a damaged, foreign or hostile file is one clear
sentence).

With a time budget (``train.time_budget``) the run's length is not given but planned: see
:meth:`Trainer.plan`.

The run directory's layout, and reading a run back: ``run.py``.

Methods with several optimizers (GANs: ``Method.phases = ("d", "g")``) get one optimizer per phase,
stepped in order within each training step; methods may re-label or re-order the data at the start
of each epoch (DeepCluster: ``Method.on_epoch_start`` / ``Method.epoch_order``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import distributed
from .checkpoint import CheckpointError, atomic_torch_save, load_run_checkpoint, save_keeping_previous
from .checkpoint import load_checkpoint  # noqa: F401 - re-exported: selfsup.train.load_checkpoint
from .config import Config, ConfigError, parse_duration, save_config
from .configure import finalize
from .backbones import fit_layers_from_data
from .data import CachedImages, auto_image_size, load_images, open_source
from .methods import Method, get_method
from .methods.base import RunState
from .monitor import collapse_warning, embedding_health
from .optim import backbone_factor, build_optimizer, lr_factor, warmup_steps_for
from .runtime import autocast, embed, grad_scaler, resolve_device, resolve_precision, step_generator
from .run import MetricsLog

log = logging.getLogger("selfsup")

CHECKPOINT_VERSION = 2  # 2: "optimizers" holds one state dict per phase
HEALTH_SAMPLES = 512
PLAN_WARMUP_STEPS = 5  # steps of a time budget's probe not timed (first-call allocations, kernel choice)
PLAN_MIN_STEPS = 10  # timed steps at least
PLAN_MIN_SECONDS = 4.0  # and at least this many seconds of timed steps (or 3% of the budget)
REPLAN_AT = (0.25, 0.5, 0.75)  # fractions of a time budget at which the run re-measures its pace
REPLAN_MIN_BUDGET = 120.0  # seconds: shorter budgets keep the rehearsal's plan
PLAN_MARGIN = 0.02  # fraction of the budget kept free for what the plan cannot measure


def planned_steps(seconds: float, step_s: float, steps_per_epoch: int, start: int, epoch_s: float,
                  save_s: float, ckpt_every: int) -> int:
    """The largest total step count ``N`` (at least ``start + 1``) whose remaining steps from ``start``,
    with ``epoch_s`` of extra work at the end of every epoch boundary they cross and a checkpoint every
    ``ckpt_every`` steps, fit in ``seconds``."""
    def cost(n: int) -> float:
        steps = n - start
        epochs = n // steps_per_epoch - start // steps_per_epoch  # epoch ends crossed
        saves = n // ckpt_every - start // ckpt_every
        return steps * step_s + epochs * epoch_s + saves * save_s

    per_step = step_s + epoch_s / steps_per_epoch + save_s / ckpt_every
    n = start + max(1, int(seconds / per_step)) if seconds > 0 else start + 1
    while n > start + 1 and cost(n) > seconds:
        n -= 1
    while cost(n + 1) <= seconds:
        n += 1
    return n


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class NonFiniteLoss(RuntimeError):
    """The loss (or, step after step, the gradients) became NaN or Inf; the run stopped and kept its
    last good checkpoint."""


MAX_NONFINITE_GRAD_STEPS = 20  # consecutive steps whose gradients are not finite before the run stops


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped at step {step}, checkpoint written to {checkpoint}; "
                         f"continue with --resume")


# --------------------------------------------------------------------------------------------------
# devices, precision, checkpoints


def restore_cuda_rng(states: list) -> None:
    """Restore the saved CUDA generators onto the GPUs this machine has: as many as both machines
    have (a run saved on 8 GPUs resumes on 1, a CUDA run resumes on a CPU-only machine, where there
    is nothing to restore). A multi-GPU run draws from one generator per process's own device."""
    if not states or not torch.cuda.is_available():
        return
    n = min(len(states), torch.cuda.device_count())
    for i in range(n):
        torch.cuda.set_rng_state(states[i].cpu(), device=i)


# --------------------------------------------------------------------------------------------------
# data


class BatchStream:
    """Batches of uint8 images ``(B, 3, H, W)`` (channels_last) from the decode cache.

    The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``; the
    last incomplete batch is dropped. The next batch is gathered from the memory map (and copied to
    the device) by a background thread while the current step runs.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, device: torch.device,
                 order_fn=None, rank: int = 0, world_size: int = 1) -> None:
        n = len(images)
        if n < batch_size:
            raise ConfigError(f"the data has {n} images, fewer than one batch of {batch_size}; "
                              f"lower --batch-size")
        self.images, self.batch_size, self.seed, self.device = images, batch_size, seed, device
        self.order_fn = order_fn  # Method.epoch_order: (epoch, generator, n) -> indices or None
        self.steps_per_epoch = n // batch_size
        # distributed: every process walks the same global order and loads its contiguous slice
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.indices = np.zeros(0, dtype=np.int64)  # of the batch last handed out by batches()

    def order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        if self.order_fn is not None:
            idx = self.order_fn(epoch, g, len(self.images))
            if idx is not None:
                idx = np.asarray(idx)
                if len(idx) < self.steps_per_epoch * self.batch_size:
                    raise RuntimeError(f"epoch_order returned {len(idx)} indices, fewer than an epoch needs")
                return idx
        return torch.randperm(len(self.images), generator=g).numpy()

    def _load(self, idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))  # idx is sorted: sequential reads
        x = x.permute(0, 3, 1, 2)  # NHWC storage == NCHW channels_last
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This process's batches of ``epoch`` from step ``start`` of it; while a batch is out,
        :attr:`indices` holds the dataset indices of its images, in the batch's order."""
        order = self.order(epoch)
        b = self.batch_size
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        chunks = [np.sort(order[i * b:(i + 1) * b][lo:hi]) for i in range(start, self.steps_per_epoch)]
        if not chunks:
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._load, chunks[0])
            for i in range(len(chunks)):
                cur = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self._load, chunks[i + 1])
                self.indices = chunks[i]
                yield cur


# --------------------------------------------------------------------------------------------------
# metrics


# --------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Owns one run. ``Trainer(cfg, run_dir).fit()`` trains; the pieces (``train_step``, ``stream``)
    are also what ``benchmarks/throughput.py`` times."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 data: CachedImages | None = None) -> None:
        self.started = time.perf_counter()  # the time budget counts from here (data loading included)
        # a Config changed after build_config (cfg.data.image_size = 64, cfg.params.update(...)) is
        # derived and checked again here: aug.size follows the image size, params are filled and typed
        self.cfg, self.run_dir = finalize(cfg), Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.rank, self.world_size, device = distributed.setup(cfg.train.device)
        self.is_main = self.rank == 0  # only rank 0 writes checkpoints, metrics and figures
        self.progress = progress and self.is_main
        self.device = resolve_device(device)
        self.precision, why = resolve_precision(self.device, cfg.train.precision)
        self.scaler = grad_scaler(self.device, self.precision)  # fp16 only
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients (bf16 / fp32: no scaler)
        self._skipped_in_a_row = 0
        if self.is_main:
            log.info("precision %s (%s)", self.precision, why)
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by "
                              f"the {self.world_size} processes")

        if data is None:
            if not cfg.data.path:
                raise ConfigError("no training data: pass --data PATH or --dataset NAME")
            if not cfg.data.image_size:  # chosen from the images (data/size.py), then kept in config.yaml
                side, why = auto_image_size(open_source(cfg.data.path, cfg.data.split, cfg.data.download),
                                            self.device.type)
                self._set_image_size(side, f"{why}; --image-size N to choose")
            data = load_images(cfg.data.path, split=cfg.data.split, image_size=cfg.data.image_size,
                               cache_dir=cfg.data.cache_dir, download=cfg.data.download, progress=self.progress)
        if not cfg.data.image_size:  # data given as decoded images: their side
            self._set_image_size(int(data.images.shape[1]), "the side of the images given")
        self.data = data
        torch.manual_seed(cfg.train.seed)
        self.method: Method = get_method(cfg.method)(cfg).to(self.device)
        if not resume:  # e.g. airbench's whitening, in every copy of the backbone; a resumed run has it
            fit_layers_from_data(self.method, data.images, cfg.aug, self.method.input_mode, self.device)
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if self.world_size > 1:
            if cfg.train.sync_bn:
                if self.device.type != "cuda":
                    raise ConfigError("train.sync_bn=true needs CUDA (torch's SyncBatchNorm); on CPU leave it off")
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            distributed.broadcast_module(self.method)
        # a closed-form method (no phases: patches) takes no steps: any folder size will do
        batch = cfg.train.batch_size if self.method.phases else min(cfg.train.batch_size, len(data))
        # the whole frames of a non-square collection for the methods whose views are random-resized
        # crops (Method.full_frame), the centre squares for the others (data/size.py)
        self.stream = BatchStream(data.full_frames if self.method.full_frame else data.images, batch, cfg.train.seed, self.device,
                                  order_fn=self.method.epoch_order, rank=self.rank, world_size=self.world_size)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.optimizers = build_phase_optimizers(self.method, cfg)
        self.base_lrs = {p: [g["lr"] for g in opt.param_groups] for p, opt in self.optimizers.items()}
        # the run's length: train.total_steps when fixed (by hand, or by a time budget's plan, which
        # records it in config.yaml so that --resume keeps it), else epochs x steps per epoch; a time
        # budget without a recorded length is planned by fit() from the run's measured throughput
        self.budget = parse_duration(cfg.train.time_budget) if cfg.train.time_budget else None
        self.planned = cfg.train.total_steps is not None or self.budget is None
        self.set_length(cfg.train.total_steps or self.steps_per_epoch * cfg.train.epochs)
        # label-free health is measured every epoch on a fixed subset of the training images
        self.health_idx = np.sort(torch.randperm(len(data), generator=torch.Generator().manual_seed(
            cfg.train.seed + 1)).numpy()[:HEALTH_SAMPLES])
        self.step = 0
        self.elapsed = 0.0
        self._stop_signal: int | None = None

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        if not self.is_main:
            self.metrics = None
            return
        save_config(cfg, self.run_dir / "config.yaml")
        tb = self.run_dir / "tensorboard" if cfg.train.logger == "tensorboard" else None
        self.metrics = MetricsLog(self.run_dir / "metrics.csv", keep_until_step=self.step if resume else None,
                                  tensorboard=tb)
        if data.skipped:
            lines = [f"{path}\t{reason}" for path, reason in data.skipped]
            (self.run_dir / "skipped.txt").write_text("\n".join(lines) + "\n")
            log.warning("%d input file(s) could not be decoded and were skipped; list in %s",
                        len(data.skipped), self.run_dir / "skipped.txt")

    def set_length(self, total_steps: int) -> None:
        """Fix the run's length; every schedule (lr, momentum, temperatures) follows it."""
        self.total_steps = int(total_steps)
        self.warmup_steps = warmup_steps_for(self.cfg.optim, self.steps_per_epoch, self.total_steps)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "method": self.cfg.method,
            "config": self.cfg.to_dict(),
            "backbone_spec": self.method.backbone_spec(),
            "model": self.method.state_dict(),
            "optimizers": {p: opt.state_dict() for p, opt in self.optimizers.items()},
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "step": self.step,
            "elapsed": self.elapsed,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def save(self, path: Path | None = None) -> None:
        """The checkpoint, atomically; ``last.pt`` keeps the one it replaces as ``previous.pt``, and
        every ``train.keep_every``-th step is also kept as ``step_<N>.pt``."""
        if not self.is_main:
            return
        if path is not None:
            atomic_torch_save(self.state(), path)
            return
        try:
            save_keeping_previous(self.state(), self.ckpt_path)
        except OSError as e:  # a full disk: the previous checkpoints are intact, say so and stop
            kept = [p.name for p in (self.ckpt_path, self.ckpt_path.with_name("previous.pt")) if p.exists()]
            raise CheckpointError(f"could not write the checkpoint of step {self.step} to {self.ckpt_path} "
                                  f"({type(e).__name__}: {e}); the run stopped, {' and '.join(kept) or 'nothing'} "
                                  f"kept; free some space and --resume") from None
        keep = self.cfg.train.keep_every
        if keep and self.step % keep == 0:
            kept = self.ckpt_path.with_name(f"step_{self.step}.pt")
            try:
                os.link(self.ckpt_path, kept)  # no copy: the same file under a second name
            except OSError:
                atomic_torch_save(self.state(), kept)

    @property
    def save_every(self) -> int:
        """Steps between checkpoints: ``train.ckpt_every``, or ``train.keep_every`` where it is shorter (a
        step to keep is a step to save; the time budget's plan counts the cost of either)."""
        keep = self.cfg.train.keep_every
        return min(self.cfg.train.ckpt_every, keep) if keep else self.cfg.train.ckpt_every

    def checkpoint_due(self, step: int) -> bool:
        """A checkpoint is written after ``step``: every ``train.ckpt_every`` steps, every
        ``train.keep_every`` steps (kept as ``step_<N>.pt``), and at the end of the run."""
        keep = self.cfg.train.keep_every
        return step % self.cfg.train.ckpt_every == 0 or bool(keep and step % keep == 0) or step == self.total_steps

    def _keep_at_seconds(self) -> None:
        """``train.keep_seconds``: the first step that ends S seconds (or more) after this session started
        is kept as ``checkpoints/at_<S>s.pt`` (once; a mark already on disk is not rewritten)."""
        now = time.perf_counter() - self.started
        for mark in self.cfg.train.keep_seconds:
            if now >= float(mark) and mark not in getattr(self, "_kept_marks", set()):
                self._kept_marks = getattr(self, "_kept_marks", set()) | {mark}
                path = self.ckpt_path.with_name(f"at_{float(mark):g}s.pt")
                if self.is_main and not path.exists():
                    atomic_torch_save(self.state(), path)
                    log.info("kept the checkpoint of step %d (%.0f s into the session) as %s", self.step, now, path)

    def _restore(self) -> None:
        ckpt_dir = self.ckpt_path.parent
        if not (self.ckpt_path.exists() or (ckpt_dir / "previous.pt").exists()):
            raise ConfigError(f"--resume: no checkpoint at {self.ckpt_path}")
        ckpt, path = load_run_checkpoint(ckpt_dir, self.device, self.cfg.method, self.cfg.model.backbone, log)
        try:
            self.method.load_state_dict(ckpt["model"])
            states = ckpt["optimizers"] if "optimizers" in ckpt else {"main": ckpt["optimizer"]}  # version 1
            for p, opt in self.optimizers.items():
                opt.load_state_dict(states[p])
            if self.scaler is not None and "grad_scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: does not fit this run's model ({str(e).splitlines()[0][:200]})") from None
        self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        restore_cuda_rng(ckpt["rng"].get("cuda", []))
        log.info("resumed from %s at step %d/%d", path, self.step, self.total_steps)

    def _set_image_size(self, side: int, why: str) -> None:
        self.cfg.data.image_size = side
        finalize(self.cfg)  # the views' side and the stem follow
        if self.is_main:
            log.info("image size %d px (automatic: %s)", side, why)

    # -- one step ------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of a single-phase method (the first phase's otherwise)."""
        return self.optimizers[self.method.phases[0]]

    def run_state(self) -> RunState:
        """What the method's ``on_epoch_start`` sees of this run (not the trainer itself)."""
        phases = self.method.phases
        return RunState(self.data.images, self.device, self.cfg.train.seed, self.step, self.total_steps,
                        self.optimizers[phases[0]] if phases else None)

    @property
    def freeze_backbone_steps(self) -> int:
        """The first steps in which only the heads learn: ``optim.freeze_backbone_frac`` of the run, at most
        ``optim.freeze_backbone_max_steps`` steps."""
        o = self.cfg.optim
        return min(round(o.freeze_backbone_frac * self.total_steps), o.freeze_backbone_max_steps)

    def set_lr(self, step: int) -> float:
        f = lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.optim.min_lr_ratio)
        fb = backbone_factor(step, self.freeze_backbone_steps, self.warmup_steps)
        for p, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self.base_lrs[p]):
                g["lr"] = base if g.get("fixed_lr") else base * f  # e.g. SimSiam's predictor (Sec. 4.4)
                if g.get("backbone"):  # optim.freeze_backbone_frac: groups split by build_phase_optimizers
                    g["lr"] *= fb
        return self.base_lrs[self.method.phases[0]][0] * f

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        self.method.train()
        batch = self.method.prepare(images, step_generator(self.device, self.cfg.train.seed, step, self.rank))
        phases = self.method.phases
        hold = step < self.freeze_backbone_steps
        if len(phases) == 1:
            with autocast(self.device, self.precision):
                out = self.method.training_step(batch)
            self._backward_step(self.optimizer, out["loss"], hold)
            if self.scaler is not None:
                self.scaler.update()
            self.method.after_step(step, self.total_steps)
            return {k: v.detach() for k, v in out.items()}
        logged: dict[str, torch.Tensor] = {}
        for phase in phases:  # e.g. a GAN: discriminator step, then generator step
            opt = self.optimizers[phase]
            with autocast(self.device, self.precision):
                out = self.method.phase_step(batch, phase)
            self._backward_step(opt, out["loss"], hold)
            for k, v in out.items():
                logged[f"loss_{phase}" if k == "loss" else k] = v.detach()
        if self.scaler is not None:
            self.scaler.update()  # once per step, after every phase's optimizer (torch's AMP recipe)
        logged["loss"] = sum(logged[f"loss_{p}"] for p in phases)
        self.method.after_step(step, self.total_steps)
        return {"loss": logged.pop("loss"), **logged}

    def _backward_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, hold_backbone: bool = False) -> None:
        """Gradients of ``loss`` (scaled in fp16, where the scaler also skips a step whose gradients
        overflowed), averaged over processes, then ``opt``'s step. ``hold_backbone``: the backbone's
        gradients are dropped, so that the step leaves it as it is (``optim.freeze_backbone_frac``)."""
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if hold_backbone:
                self._drop_backbone_grads()
            self._sync(opt)
            if self._finite_gradients(opt):
                opt.step()
            return
        self.scaler.scale(loss).backward()
        if hold_backbone:
            self._drop_backbone_grads()
        self._sync(opt)
        self.scaler.step(opt)

    def _drop_backbone_grads(self) -> None:
        for p in self.method.backbone.parameters():
            p.grad = None

    def _finite_gradients(self, opt: torch.optim.Optimizer) -> bool:
        """False (the step is skipped, its gradients dropped, a warning logged) when a gradient of
        ``opt`` holds a NaN or Inf although the loss is finite. Without a scaler (bf16, fp32) nothing
        else would stop such a step from writing NaN into the weights: measured on a CPU with native
        bf16 (torch 2.14), the weight gradient of a 3x3 convolution on a 1x1 map (a ResNet's last stage at
        16 px) came back with 384 NaNs in one step of three, the loss finite. A step is one reduction
        per tensor more. ``MAX_NONFINITE_GRAD_STEPS`` such steps in a row stop the run as a NaN loss does."""
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            self._skipped_in_a_row = 0
            return True
        opt.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        log.warning("step %d: non-finite gradients with a finite loss; the step is skipped (%d so far)",
                    self.step + 1, self.skipped_steps)
        if self._skipped_in_a_row >= MAX_NONFINITE_GRAD_STEPS:
            self._stop_non_finite(f"the gradients were NaN or Inf in {self._skipped_in_a_row} steps in a row "
                                  f"(up to step {self.step + 1})")
        return False

    def _sync(self, opt: torch.optim.Optimizer) -> None:
        """Distributed: average this optimizer's gradients over processes (see distributed.py)."""
        if self.world_size > 1:
            distributed.sync_gradients([p for g in opt.param_groups for p in g["params"]])

    def health(self) -> dict[str, float]:
        """Collapse indicators of the backbone's features on the fixed subset (see monitor.py)."""
        feats = embed(self.method.encoder, self.data.images[self.health_idx], self.cfg.aug, self.device,
                      self.precision, input_mode=self.method.input_mode)
        return embedding_health(feats)

    # -- the loop ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def fit_closed_form(self) -> Path:
        """A method without phases (``patches``) is fitted from the data in one pass, no gradient: the
        fit is the run's one step (metrics row, health, checkpoint, figures); a time budget has
        nothing to size. On ``--resume`` a fitted run is complete."""
        if bool(getattr(self.method, "fitted", False)):
            log.info("run already complete (%s is fitted)", self.cfg.method)
            return self.run_dir
        if self.budget is not None:
            log.info("%s is fitted in one pass without gradient steps: the time budget %s is not used",
                     self.cfg.method, format_duration(self.budget))
        t0 = time.perf_counter()
        info = self.method.fit(self.data.images, self.device, self.cfg.train.seed)
        self.step, self.total_steps = 1, 1
        self.elapsed = time.perf_counter() - t0
        if self.is_main:
            h = self.health()
            self.metrics.write({"step": 1, "epoch": 1.0, **{k: round(float(v), 6) for k, v in info.items()},
                                "elapsed_s": round(self.elapsed, 2), "feat_std": f"{h['feat_std']:.4g}",
                                "rankme": f"{h['rankme']:.4g}"})
            log.info("%s fitted in %.1f s: %s", self.cfg.method, self.elapsed,
                     ", ".join(f"{k} {float(v):.4g}" for k, v in info.items()))
            self.save()
            self.draw_figures()
        return self.run_dir

    def fit(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if not self.method.phases:
            return self.fit_closed_form()
        if self.planned and self.step >= self.total_steps:
            log.info("run already complete (%d steps)", self.step)
            return self.run_dir
        bar_shown = self.progress and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not bar_shown,
                   dynamic_ncols=True, desc=cfg.method)
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        line_at, line_step = time.perf_counter(), self.step  # the last plain progress line
        try:
            with self._signals():
                while self.step < self.total_steps:
                    epoch, start = divmod(self.step, self.steps_per_epoch)
                    self._epoch_started = time.perf_counter()
                    self.method.on_epoch_start(self.run_state(), epoch)
                    if not self.planned:
                        self.plan(epoch)
                        bar.reset(total=self.total_steps)
                        line_at, line_step = time.perf_counter(), self.step
                        window_start = line_at  # the rehearsal is not the first row's throughput
                    for images in self.stream.batches(epoch, start):
                        t0 = time.perf_counter()
                        out = self.run_step(images, epoch)
                        self.step += 1
                        self.elapsed += time.perf_counter() - t0
                        for k, v in out.items():
                            window[k] = window.get(k, 0.0) + float(v)
                        window_steps += 1
                        end_of_epoch = self.step % self.steps_per_epoch == 0
                        if self.is_main and (self.step % cfg.train.log_every == 0 or end_of_epoch
                                             or self.step == self.total_steps):
                            dt = time.perf_counter() - window_start
                            row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                                   **{k: round(v / window_steps, 6) for k, v in window.items()},
                                   "lr": f"{self.lr:.6g}",
                                   "img_per_s": round(window_steps * cfg.train.batch_size / dt, 1),
                                   "elapsed_s": round(self.elapsed, 2), "feat_std": "", "rankme": ""}
                            if end_of_epoch or self.step == self.total_steps:  # a run shorter than an epoch too
                                h = self.health()
                                row.update(feat_std=f"{h['feat_std']:.4g}", rankme=f"{h['rankme']:.4g}")
                                warning = collapse_warning(h, self.method.encoder.out_dim)
                                if warning:
                                    log.warning("epoch %d: %s", epoch + 1, warning)
                            self.metrics.write(row)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=row["img_per_s"], refresh=False)
                            bar.set_description(f"{cfg.method} epoch {epoch + 1}/{self.epochs}")
                            window, window_steps, window_start = {}, 0, time.perf_counter()
                        bar.update(1)
                        now = time.perf_counter()
                        if self.is_main and not bar_shown and (
                                now - line_at >= cfg.train.log_seconds or self.step == self.total_steps):
                            self.progress_line(float(out["loss"]), (self.step - line_step) / max(now - line_at, 1e-9))
                            line_at, line_step = now, self.step
                        if self.checkpoint_due(self.step):
                            self.save()
                        self._keep_at_seconds()
                        if distributed.any_flag(self._stop_signal is not None, self.device):
                            if not self.checkpoint_due(self.step):
                                self.save()
                            raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.step, self.ckpt_path)
                        if self.replan():
                            bar.total = self.total_steps
                            bar.refresh()
                        if self.step >= self.total_steps:  # a planned length may end mid-epoch
                            break
        finally:
            bar.close()
        if self.is_main:
            self.draw_figures()
            if self.budget is not None:
                used = time.perf_counter() - self.started
                log.info("time budget %s: this session of the run took %s (%.1f%% of the budget)",
                         format_duration(self.budget), format_duration(used), 100 * used / self.budget)
        return self.run_dir

    @property
    def epochs(self) -> int:
        """Epochs the run touches (the last one may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def run_step(self, images: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step of the loop at ``self.step`` (the step counter is the caller's)."""
        self.lr = self.set_lr(self.step)
        if self.is_main and self.step == self.freeze_backbone_steps > 0:
            log.info("step %d: the backbone starts to learn (optim.freeze_backbone_frac=%g: the heads alone until "
                     "now; its rate ramps up over %d steps)", self.step, self.cfg.optim.freeze_backbone_frac,
                     self.warmup_steps)
        self.method.batch_indices = torch.from_numpy(self.stream.indices)
        out = self.train_step(images, self.step)
        loss = float(out["loss"])
        if distributed.any_flag(not math.isfinite(loss), self.device):
            self._non_finite(loss, epoch)
        return out

    def progress_line(self, loss: float, steps_per_s: float) -> None:
        """A plain line for logs (nohup, pipes, CI) where no progress bar is drawn."""
        left = (self.total_steps - self.step) / max(steps_per_s, 1e-9)
        log.info("%s step %d/%d (epoch %.2f)  loss %.4f  %.0f img/s  elapsed %s  ETA %s", self.cfg.method,
                 self.step, self.total_steps, self.step / self.steps_per_epoch, loss,
                 steps_per_s * self.cfg.train.batch_size, format_duration(time.perf_counter() - self.started),
                 format_duration(left))

    # -- the time budget -----------------------------------------------------------------------
    def plan(self, epoch: int) -> None:
        """Fix ``total_steps`` so that the whole run ends within ``train.time_budget``.

        Measures, on this machine and this run, the time of a training step (a few warm-up steps
        excluded), of the per-epoch work (the method's ``on_epoch_start``, e.g. DeepCluster's
        clustering, timed when the epoch started; the health check), of a checkpoint and of the
        figures; then rolls the model, optimizers and RNG back to where they were, so the measured
        steps leave no trace. The plan is printed and recorded in ``config.yaml``
        (``train.total_steps``), so ``--resume`` continues the same schedule."""
        budget = self.budget
        snapshot = (copy.deepcopy(self.method.state_dict()),
                    {p: copy.deepcopy(o.state_dict()) for p, o in self.optimizers.items()},
                    torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                    self.step, self.elapsed, copy.deepcopy(self.scaler.state_dict()) if self.scaler else None)
        epoch_work = time.perf_counter() - self._epoch_started if hasattr(self, "_epoch_started") else 0.0
        times: list[float] = []
        probe_limit = min(max(1.5 * PLAN_MIN_SECONDS, 0.03 * budget), 0.1 * budget)  # seconds of rehearsal at most
        self.method.rehearse()  # e.g. SwAV's queue in use, as in most of the run (rolled back below)
        t_probe = t_prev = time.perf_counter()
        e = epoch
        while not times or not self._probe_done(times, t_prev - t_probe, probe_limit):
            it = self.stream.batches(e, self.step % self.steps_per_epoch)
            for images in it:
                self.run_step(images, e)
                self.step += 1
                self._sync_device()
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
                if self._probe_done(times, now - t_probe, probe_limit):
                    break
            it.close()
            e += 1
        measured = times[PLAN_WARMUP_STEPS:]
        step_s = float(np.mean(measured))
        self.health()  # once to warm up, once timed
        t0 = time.perf_counter()
        self.health()
        health_s = time.perf_counter() - t0
        tmp = self.ckpt_path.with_name(".plan.pt")
        t0 = time.perf_counter()
        self.save(tmp)
        save_s = time.perf_counter() - t0
        tmp.unlink(missing_ok=True)
        t0 = time.perf_counter()
        if self.is_main:
            self.draw_figures()
        figures_s = time.perf_counter() - t0
        # roll back: the measured steps were a rehearsal
        model, opts, rng, cuda_rng, self.step, self.elapsed, scaler = snapshot
        if scaler is not None:
            self.scaler.load_state_dict(scaler)
        self.method.load_state_dict(model)
        for p, o in self.optimizers.items():
            o.load_state_dict(opts[p])
        torch.set_rng_state(rng)
        if cuda_rng:
            torch.cuda.set_rng_state_all(cuda_rng)
        self.method.on_epoch_start(self.run_state(), epoch)  # cheap now: the epoch's work is in the restored state
        left = budget * (1 - PLAN_MARGIN) - (time.perf_counter() - self.started) - figures_s - save_s
        total = planned_steps(left, step_s, self.steps_per_epoch, self.step, epoch_work + health_s,
                              save_s, self.save_every)
        total = int(distributed.broadcast(torch.tensor([total], device=self.device)).item())
        self.set_length(total)
        self.cfg.train.total_steps = total
        self.planned = True
        # the re-plans (replan) measure the real pace from here on, this session only
        self._replan = {"t0": time.perf_counter(), "step": self.step, "end_s": figures_s + save_s,
                        "marks": [f for f in REPLAN_AT if budget >= REPLAN_MIN_BUDGET and self.world_size == 1]}
        end = time.time() + (total - self.step) * step_s + (self.epochs - epoch) * (epoch_work + health_s) + figures_s
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            log.info("time budget %s: %.0f ms per step (%.0f img/s, mean of %d steps), %.1f s per epoch of "
                     "other work, %.1f s per checkpoint, %.1f s for the figures -> %d steps (%.2f epochs of %d "
                     "steps); expected end %s", format_duration(budget), 1000 * step_s,
                     self.cfg.train.batch_size / step_s, len(measured), epoch_work + health_s, save_s, figures_s,
                     total, total / self.steps_per_epoch, self.steps_per_epoch, time.strftime("%H:%M:%S",
                                                                                              time.localtime(end)))
            if total - self.step <= 1:
                log.warning("time budget %s leaves room for %d step(s) only; give the run more time",
                            format_duration(budget), total - self.step)

    def replan(self) -> bool:
        """Re-measure the pace once a fraction of the budget has passed (``REPLAN_AT``, budgets of
        ``REPLAN_MIN_BUDGET`` or more): the wall time per step of the real run since the plan (every
        per-epoch work and checkpoint included) fixes the steps left, so that a machine that speeds up
        or slows down after the rehearsal still ends on time. The new length is recorded in
        ``config.yaml``; every schedule follows it from this step on. Only the session that planned
        re-plans (a resumed run keeps its recorded length), and not under torchrun (the processes would
        reach the marks at different steps). Returns whether the length changed."""
        state = getattr(self, "_replan", None)
        if not state or not state["marks"] or self.budget is None:
            return False
        used = time.perf_counter() - self.started
        if used < state["marks"][0] * self.budget:
            return False
        state["marks"].pop(0)
        done = self.step - state["step"]
        if done < 1:
            return False
        pace = (time.perf_counter() - state["t0"]) / done
        left = self.budget * (1 - PLAN_MARGIN) - used - state["end_s"]
        total = max(self.step + 1, self.step + int(left // pace))
        if abs(total - self.total_steps) <= max(1, 0.01 * self.total_steps):
            return False
        if self.is_main:
            log.info("time budget %s: at %.0f%% of it, %.0f ms per step measured since the plan -> %d steps "
                     "instead of %d", format_duration(self.budget), 100 * used / self.budget, 1000 * pace, total,
                     self.total_steps)
        held = self.freeze_backbone_steps
        self.set_length(total)
        self.cfg.train.total_steps = total
        if 0 < held < self.step and self.freeze_backbone_steps > held:
            # optim.freeze_backbone_frac: the backbone already learns; a longer run must not hold it again.
            # Recorded as the cap, so that a resumed run holds the same steps.
            self.cfg.optim.freeze_backbone_max_steps = held
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        return True

    @staticmethod
    def _probe_done(times: list[float], spent: float, limit: float) -> bool:
        timed = len(times) - PLAN_WARMUP_STEPS
        return timed >= 2 and (spent >= limit or (timed >= PLAN_MIN_STEPS
                                                  and sum(times[PLAN_WARMUP_STEPS:]) >= PLAN_MIN_SECONDS))

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def draw_figures(self) -> list[Path]:
        """The method's pictures of its own task into ``RUN_DIR/figures`` (a failure is logged, never
        fatal: the trained weights are already saved)."""
        out = self.run_dir / "figures"
        out.mkdir(parents=True, exist_ok=True)
        was_training = self.method.training
        self.method.eval()
        try:
            return self.method.figures(self.data, out, self.device)
        except Exception as e:  # noqa: BLE001 - a picture must never cost the run
            log.warning("could not draw the %s figures: %s: %s", self.cfg.method, type(e).__name__, e)
            return []
        finally:
            self.method.train(was_training)

    def _non_finite(self, loss: float, epoch: int) -> None:
        self._stop_non_finite(f"loss became {loss} at step {self.step + 1} (epoch {epoch + 1})")

    def _stop_non_finite(self, what: str) -> None:
        kept = (f"the last good checkpoint ({self.ckpt_path}) is kept" if self.ckpt_path.exists()
                else "no checkpoint had been written yet")
        raise NonFiniteLoss(f"{what}; the run stopped and {kept}. Lower optim.lr, or try train.precision=fp32, "
                            f"and --resume.")


def build_phase_optimizers(method: Method, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per phase of the method, over the param groups tagged with that phase (groups
    of a single-phase method need no tag). Groups may override ``lr`` (given per 256 images, like
    ``optim.lr``), ``betas``, ``weight_decay``."""
    groups = method.param_groups()
    if cfg.optim.freeze_backbone_frac > 0:  # the backbone's share of each group gets its own rate (set_lr)
        mine = {id(p) for p in method.backbone.parameters()}
        groups = [part for g in groups for part in (
            {**g, "params": [p for p in g["params"] if id(p) not in mine]},
            {**g, "params": [p for p in g["params"] if id(p) in mine], "backbone": True}) if part["params"]]
    phases = method.phases
    out = {}
    for phase in phases:
        mine = [dict(g) for g in groups if g.get("phase", phases[0]) == phase]
        if not mine:
            raise RuntimeError(f"{method.name}: no parameters for phase '{phase}'")
        for g in mine:
            g.pop("phase", None)
            if "lr" in g:
                g["lr"] = g["lr"] * cfg.train.batch_size / 256
        out[phase] = build_optimizer(mine, cfg.optim, cfg.train.batch_size)
    unknown = {g.get("phase") for g in groups} - set(phases) - {None}
    if unknown:
        raise RuntimeError(f"{method.name}: param groups name unknown phases {unknown}")
    return out


def pretrain(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
             data: CachedImages | None = None) -> Path:
    """Train ``cfg.method`` and return the run directory. See the module docstring for its layout."""
    out = Path(out)
    ckpt = out / "checkpoints" / "last.pt"
    if not resume and ckpt.exists():
        raise ConfigError(f"{out} already holds a run (checkpoints/last.pt); pass --resume to continue it "
                          f"or choose another --out")
    return Trainer(cfg, out, resume=resume, progress=progress, data=data).fit()
