"""Settings of a Distill-QAT run (UPQ stage 2); every field is recorded in the output checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..digest import json_digest
from ..grids import GridSpec
from ..precision import check_mixed_precision
from .data import DataConfig
from .losses import LOSSES, BoundLoss
from .memory import check_checkpointing
from ..ptq.handoff import SCALE_INITS
from ..trainable import check_trainable
from .student import INITS, Calibration

TEACHER_DTYPES = ("auto", "float32", "bfloat16")
# Fields that do not change the training trajectory: a run may resume with other values.
# gradient_checkpointing and block_cache_mib only trade memory and time: the numbers are the same
_NOT_TRAJECTORY = {"gradient_checkpointing", "block_cache_mib", "log_every", "eval_every", "save_every",
                   "keep_checkpoints", "steps", "tokens"}


@dataclass
class DistillConfig:
    """Everything that defines a Distill-QAT run.

    Length: ``steps`` optimizer steps, or ``tokens`` nominal training tokens
    (``steps = ceil(tokens / (batch_size * grad_accum * processes * seq_len))``).
    ``teacher`` is the frozen original (default: ``model``, or the source recorded in the INT4
    checkpoint); set it when the student starts from modified float weights (BitDistiller's clipping).
    ``batch_size`` is per process and micro-step. ``mix_ratio`` (in ``data``) is the fraction of
    chat samples when ``data.kind == "mix"``.
    ``delta_init`` is the INT2 start (:mod:`upq.ptq.handoff`); ``output`` measures layer inputs on
    ``calib_samples`` x ``calib_seq_len`` tokens of the training split of ``data.text_source``.
    ``latent_from``: the work directory of the block stage that wrote ``int4_dir``; the student
    starts from its latent float weights instead of the dequantized codes (progressive only).
    ``first_loss`` replaces ``loss`` for the first ``first_loss_steps`` steps (e.g. forward KL while
    gJSD is saturated near its ceiling). ``train`` picks what trains: latent ``weights``, quantizer
    ``scales`` (Adam eps ``scale_eps``: their LSQ-scaled gradients are ~1e-8..1e-7, where Adam's
    usual 1e-8 would shrink their steps) and RMSNorm ``norms`` (at ``lr_scale``).
    """

    student_init: str = "progressive"
    int4_dir: str | None = None
    latent_from: str | None = None
    model: str | None = None
    teacher: str | None = None
    grid: str = "seq"
    bits: int = 2
    group_size: int | None = None
    delta_init: str = "max"
    calib_samples: int = 16
    calib_seq_len: int = 256
    include: list[str] | None = None
    exclude: list[str] | None = None

    loss: str = "gjsd"
    first_loss: str | None = None
    first_loss_steps: int = 0
    beta: float = 0.5
    gamma: float | None = None
    gamma_batches: int = 4
    # Tokens per chunk of the loss's full-vocabulary logits. 128 keeps each (chunk, vocab) float32
    # buffer of a 49k vocabulary under glibc's 32 MiB mmap ceiling, so freed buffers are reused
    # instead of page-faulted in again (part of the step speed-up in bench/results/distill_profile_*.md),
    # with less memory than 1024.
    chunk_tokens: int = 128

    data: DataConfig = field(default_factory=DataConfig)

    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr_weight: float = 5e-5
    lr_scale: float = 5e-4
    scale_eps: float = 1e-12
    train: tuple[str, ...] = ("weights", "scales")
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"
    teacher_dtype: str = "auto"
    gradient_checkpointing: str = "mlp"  # memory.CHECKPOINTING; bench/results/distill_rate_memory.md
    # MiB of freed >= 1 MiB CPU blocks kept for reuse (memory.cpu_block_cache; 0: glibc malloc);
    # bench/results/distill_block_cache.md
    block_cache_mib: int = 128
    cpu: bool = False

    log_every: int = 10
    eval_every: int = 0
    save_every: int = 100
    keep_checkpoints: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if self.student_init not in INITS:
            raise ValueError(f"student_init must be one of {INITS}, got {self.student_init!r}")
        if self.student_init == "progressive" and not self.int4_dir:
            raise ValueError("progressive initialisation needs the INT4 checkpoint (int4_dir / --from)")
        if self.latent_from is not None and self.student_init != "progressive":
            raise ValueError("latent_from needs student_init='progressive'")
        if self.delta_init not in SCALE_INITS:
            raise ValueError(f"delta_init must be one of {SCALE_INITS}, got {self.delta_init!r}")
        self.train = check_trainable(self.train)
        if self.first_loss is not None and self.first_loss not in LOSSES:
            raise ValueError(f"unknown first_loss {self.first_loss!r}; choose one of {sorted(LOSSES)}")
        if self.first_loss_steps < 0 or (self.first_loss is None) != (self.first_loss_steps == 0):
            raise ValueError("first_loss and first_loss_steps > 0 go together (the loss of the first steps)")
        if self.calib_samples < 1 or self.calib_seq_len < 2 or self.scale_eps <= 0:
            raise ValueError("calib_samples >= 1, calib_seq_len >= 2 and scale_eps > 0 are required")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError("steps / tokens must be positive")
        if self.batch_size < 1 or self.grad_accum < 1 or self.chunk_tokens < 1 or self.gamma_batches < 1:
            raise ValueError("batch_size, grad_accum, chunk_tokens and gamma_batches must be >= 1")
        if self.lr_weight < 0 or self.lr_scale < 0:
            raise ValueError("learning rates must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1] and warmup_ratio in [0, 1)")
        check_mixed_precision(self.mixed_precision)
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        self.gradient_checkpointing = check_checkpointing(self.gradient_checkpointing)
        if self.block_cache_mib < 0:
            raise ValueError(f"block_cache_mib must be >= 0 (0 turns the block cache off), got {self.block_cache_mib}")
        if self.save_every < 1 or self.log_every < 1 or self.eval_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every, log_every, keep_checkpoints must be >= 1 and eval_every >= 0")
        self.spec  # validates grid / bits / group size

    @property
    def spec(self) -> GridSpec:
        """The student's grid."""
        return GridSpec(self.grid, self.bits, self.group_size)

    def total_steps(self, processes: int) -> int:
        """Optimizer steps of the run for ``processes`` data-parallel processes."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum * processes * self.data.seq_len
        return max(1, math.ceil(self.tokens / per_step))

    @property
    def calibration(self) -> Calibration:
        """Calibration text of the output-aware hand-off."""
        return Calibration(self.calib_samples, self.calib_seq_len, self.data.text_source)

    def loss_at(self, step: int) -> str:
        """The loss of optimizer step ``step`` (0-based): ``first_loss`` for the first steps, then ``loss``."""
        return self.first_loss if self.first_loss is not None and step < self.first_loss_steps else self.loss

    def losses_used(self) -> set[str]:
        """Every loss the run uses."""
        return {self.loss} | ({self.first_loss} if self.first_loss else set())

    def build_loss(self, loss: str, gamma: float | None = None) -> BoundLoss:
        """``loss`` with this run's parameters bound (CAKLD: ``gamma``, else the estimate passed in)."""
        if loss == "gjsd":
            return BoundLoss(LOSSES[loss], beta=self.beta)
        if loss == "cakld":
            value = self.gamma if self.gamma is not None else gamma
            if value is None:
                raise ValueError("cakld needs gamma (estimated from the teacher before training)")
            return BoundLoss(LOSSES[loss], gamma=value)
        return BoundLoss(LOSSES[loss])

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    def fingerprint(self, processes: int) -> str:
        """Identity of the training trajectory (what a checkpoint must match to resume)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAJECTORY}
        payload["total_steps"] = self.total_steps(processes)
        payload["processes"] = processes
        return json_digest(payload)
