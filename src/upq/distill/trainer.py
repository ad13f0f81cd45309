"""UPQ stage 2: Distill-QAT of the INT2 student against the frozen original model, on accelerate.

One process or many (``accelerate launch``, DDP): the global micro-batch is split evenly over
processes, and every micro-loss is a *sum* over tokens divided by the number of loss tokens of
the whole optimizer step (all micro-batches, all processes), so the update does not depend on
how the global batch is split. Losses are computed from the final hidden states in chunks of
tokens (``losses.chunked_loss``): full-vocabulary logits never exist for the whole batch.

A run lives in a work directory: training checkpoints every ``save_every`` steps (trainable
tensors, optimizer, scheduler, data position, RNG) and ``metrics.jsonl``; teacher responses are
cached in ``DataConfig.response_cache()``. Re-running with the same settings resumes from the
newest checkpoint and reproduces the uninterrupted loss sequence. At the end the student is
packed and saved as a upq checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from ..checkpoint import save_quantized
from ..logs import get_logger, progress_enabled
from ..models import BUNDLED_MODEL, load_model
from ..modules import pack_model
from ..peak_memory import peak_rss_mib
from ..precision import native_bf16, use_bf16
from .config import DistillConfig
from .data import Batch, SampleStream, build_stream, collate, heldout_samples
from .losses import BoundLoss, chunked_loss, estimate_cakld_gamma
from .memory import cpu_block_cache, enable_checkpointing, share_frozen_tensors
from .state import ResumeError, TrainState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..trainable import lr_factor, trainable_groups, trainable_state
from .student import Student, build_student

log = get_logger("distill")
METHOD = "upq-distill"


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a call of :func:`distill` did."""

    out_dir: Path | None
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Backbone(nn.Module):
    """A causal LM seen as ``(input_ids, attention_mask) -> final hidden states`` (what DDP wraps)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden`` (the output embedding, with the model's logit soft-capping if any)."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _make_accelerator(cfg: DistillConfig) -> Any:
    """An ``Accelerator`` without its own mixed precision: autocast is ours
    (:func:`upq.precision.use_bf16`), so several runs with different precisions can share one
    process (accelerate's state is global)."""
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision="no")


def _teacher_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype:
    if cfg.teacher_dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.teacher_dtype]


class _Run:
    """The state of one training invocation (models, data, optimizer, accelerator)."""

    def __init__(self, cfg: DistillConfig, work_dir: Path, accelerator: Any) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.acc = accelerator
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.total_steps = cfg.total_steps(self.world)
        self.fingerprint = cfg.fingerprint(self.world)
        self.bf16 = use_bf16(cfg.mixed_precision, self.device)

    def autocast(self) -> Any:
        """bf16 autocast on the run's device when enabled, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ----------------------------------------------------------------------------- setup
    def build(self) -> None:
        cfg = self.cfg
        student = build_student(cfg.student_init, int4_dir=cfg.int4_dir, model_name=cfg.model, spec=cfg.spec,
                                delta_init=cfg.delta_init, include=cfg.include, exclude=cfg.exclude,
                                train=cfg.train, calibration=cfg.calibration, latent_from=cfg.latent_from)
        self.student_info: Student = student
        self.teacher_name = cfg.teacher or cfg.model or student.source_model
        teacher, _ = load_model(self.teacher_name, dtype=_teacher_dtype(cfg, self.device), device=self.device)
        teacher.requires_grad_(False).eval()
        self.teacher = Backbone(teacher)
        self.tokenizer = student.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id)
        cache = cfg.data.response_cache()
        # The chat data are the original's own answers in fp32, whatever the teacher's dtype: cached by the
        # writer's weights, so they are shared with the block stages and with fp32 runs.
        writer = teacher
        if cfg.data.chat_ratio > 0 and teacher.dtype != torch.float32:
            writer, _ = load_model(self.teacher_name, dtype=torch.float32, device=self.device)
        with self.acc.main_process_first():  # the main process generates chat data, the others reuse its cache
            self.stream: SampleStream = build_stream(cfg.data, self.tokenizer, writer, cache, cfg.seed)
            self.heldout = heldout_samples(cfg.data, self.tokenizer, writer, cache)
        del writer
        lm = student.model
        shared = share_frozen_tensors(lm, teacher)
        log.info("student shares %.0f MiB of frozen tensors with the teacher; recomputation: %s; forward passes in %s, "
                 "teacher in %s", shared / 2**20, cfg.gradient_checkpointing, "bf16 autocast" if self.bf16 else "fp32",
                 str(teacher.dtype).removeprefix("torch."))
        enable_checkpointing(lm, cfg.gradient_checkpointing)
        lm.train()
        kinds = trainable_groups(lm, cfg.train)
        self.initial_scales = [p.detach().clone() for p in trainable_groups(lm, ("scales",))["scales"]]
        settings = {"weights": {"lr": cfg.lr_weight}, "scales": {"lr": cfg.lr_scale, "eps": cfg.scale_eps},
                    "norms": {"lr": cfg.lr_scale}}
        groups = [{"params": params, "name": kind, **settings[kind]} for kind, params in kinds.items() if params]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.total_steps, warmup, cfg.min_lr_ratio))
        self.backbone, self.optimizer = self.acc.prepare(Backbone(lm), optimizer)
        self.params = [p for g in groups for p in g["params"]]

    @torch.no_grad()
    def scale_movement(self) -> dict[str, float]:
        """How far the quantizer scales moved from their start: median and max of |Delta/Delta0 - 1|."""
        now = trainable_groups(self.student.lm, ("scales",))["scales"]
        if not now:
            return {}
        rel = torch.cat([(p.float() / p0.float() - 1).abs().flatten() for p, p0 in zip(now, self.initial_scales)])
        return {"scale_rel_change_median": float(rel.median()), "scale_rel_change_max": float(rel.max())}

    @property
    def student(self) -> Backbone:
        return self.acc.unwrap_model(self.backbone)

    # ----------------------------------------------------------------------------- data
    def micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step ``step`` (0-based)."""
        cfg = self.cfg
        per_micro = cfg.batch_size * self.world
        out = []
        for m in range(cfg.grad_accum):
            start = (step * cfg.grad_accum + m) * per_micro + self.rank * cfg.batch_size
            out.append(collate(self.stream.take(start, cfg.batch_size), self.pad_id).to(self.device))
        return out

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.tolist()

    # ----------------------------------------------------------------------------- losses
    def _teacher_hidden(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.teacher(batch.input_ids, batch.attention_mask)

    def _loss_sum(self, loss: BoundLoss, hidden: torch.Tensor, batch: Batch, teacher_hidden: torch.Tensor | None) -> torch.Tensor:
        return loss.chunked(hidden, teacher_hidden, self.student.head, self.teacher.head if loss.needs_teacher else None,
                            batch.loss_mask, labels=batch.labels() if loss.needs_labels else None,
                            chunk_tokens=self.cfg.chunk_tokens, reduction="sum")

    @torch.no_grad()
    def estimate_gamma(self) -> float:
        """CAKLD's gamma: the teacher's mean top-1 probability on the first training batches."""
        def teacher_logits() -> Iterator[torch.Tensor]:
            for g in range(self.cfg.gamma_batches):
                batch = collate(self.stream.take(g * self.cfg.batch_size, self.cfg.batch_size), self.pad_id).to(self.device)
                hidden = self._teacher_hidden(batch)[batch.loss_mask]
                for start in range(0, hidden.shape[0], self.cfg.chunk_tokens):
                    yield self.teacher.head(hidden[start : start + self.cfg.chunk_tokens])

        return estimate_cakld_gamma(teacher_logits())

    @torch.no_grad()
    def heldout_kl(self) -> float | None:
        """Mean forward KL(teacher || student) per loss token on the held-out samples."""
        if not self.heldout:
            return None
        mine = self.heldout[self.rank :: self.world]
        total, count = 0.0, 0
        student = self.student
        for start in range(0, len(mine), self.cfg.batch_size):
            batch = collate(mine[start : start + self.cfg.batch_size], self.pad_id).to(self.device)
            with self.autocast():
                hidden = student(batch.input_ids, batch.attention_mask)
                t_hidden = self.teacher(batch.input_ids, batch.attention_mask)
                kl = chunked_loss("forward_kl", hidden, t_hidden, student.head, self.teacher.head, batch.loss_mask,
                                  chunk_tokens=self.cfg.chunk_tokens, reduction="sum")
            total += float(kl)
            count += batch.tokens
        total, count = self._global_sum([total, count])
        return total / max(count, 1)

    # ----------------------------------------------------------------------------- one step
    def train_step(self, step: int, gamma: float | None) -> dict[str, Any]:
        """Forward/backward over the step's micro-batches, clip, check, update. Returns metrics."""
        step_loss = self.cfg.build_loss(self.cfg.loss_at(step), gamma)
        with record_function("distill.data"):
            batches = self.micro_batches(step)
        n_loss, n_input = self._global_sum([sum(b.tokens for b in batches),
                                            sum(int(b.attention_mask.sum()) for b in batches)])
        if n_loss == 0:
            raise ValueError(f"step {step + 1}: the global batch has no loss tokens (check the data / masks)")
        loss_sum = 0.0
        # record_function labels name the parts of a step for torch.profiler (bench/distill_throughput.py)
        for m, batch in enumerate(batches):
            with record_function("distill.teacher_forward"):
                teacher_hidden = self._teacher_hidden(batch) if step_loss.needs_teacher else None
            sync = m == len(batches) - 1
            with self.acc.no_sync(self.backbone) if not sync else nullcontext():
                with self.autocast():
                    with record_function("distill.student_forward"):
                        hidden = self.backbone(batch.input_ids, batch.attention_mask)
                    with record_function("distill.loss"):
                        part = self._loss_sum(step_loss, hidden, batch, teacher_hidden)
                with record_function("distill.backward"):
                    self.acc.backward(part * (self.world / n_loss))
            loss_sum += float(part.detach())
        (loss_total,) = self._global_sum([loss_sum])
        loss = loss_total / n_loss
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        with record_function("distill.optimizer"):
            grad_norm = float(self.acc.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; training stopped. "
                f"The last good checkpoint in {self.work_dir} is intact: lower --lr-weight/--lr-scale "
                "(or check the data) and re-run to resume from it."
            )
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        with record_function("distill.optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "loss_name": step_loss.name, "grad_norm": grad_norm, "loss_tokens": n_loss, "input_tokens": n_input,
                "lr": next(iter(lrs.values())), "lr_weight": lrs.get("weights"), "lr_scale": lrs.get("scales")}

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, state: TrainState) -> None:
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.acc.is_main_process:
            trainable = {n: p for n, p in self.student.lm.named_parameters() if p.requires_grad}
            save_checkpoint(self.work_dir, state, trainable, self.optimizer, self.scheduler, rngs,
                            self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self) -> TrainState:
        path = latest_checkpoint(self.work_dir)
        if path is None:
            return TrainState(fingerprint=self.fingerprint)
        state, trainable, opt_state, sched_state, rngs = load_checkpoint(path, self.fingerprint)
        params = dict(self.student.lm.named_parameters())
        expected = set(trainable_state(self.student.lm))
        if set(trainable) != expected:
            raise ResumeError(f"{path}: trainable tensors do not match the student")
        with torch.no_grad():
            for name, tensor in trainable.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(sched_state)
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        log.info("resuming distillation at step %d/%d from %s", state.step, self.total_steps, path)
        return state


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (what the resumed checkpoint had seen)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``work_dir/metrics.jsonl``."""
    path = Path(work_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def distill(
    cfg: DistillConfig,
    out_dir: str | Path | None,
    work_dir: str | Path,
    accelerator: Any = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) Distill-QAT and save the packed INT2 student to ``out_dir`` (None: do not save).

    ``on_step`` is called with each step's metrics record after the step (and any checkpoint).
    """
    acc = accelerator if accelerator is not None else _make_accelerator(cfg)
    work_dir = Path(work_dir)
    run = _Run(cfg, work_dir, acc)
    if acc.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    with cpu_block_cache(cfg.block_cache_mib if run.device.type == "cpu" else 0) as cache_stats:
        result = _train(run, out_dir, on_step)
        if cache_stats is not None:
            stats = cache_stats()
            log.info("block cache: peak %.0f MiB mapped, %.1f%% of requests reused a block",
                     stats["peak_mapped_bytes"] / 2**20, 100 * stats["hits"] / max(stats["hits"] + stats["misses"], 1))
    return result


def _train(run: _Run, out_dir: str | Path | None, on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    """:func:`distill` once its run and work directory exist."""
    cfg, acc, work_dir = run.cfg, run.acc, run.work_dir
    run.build()
    state = run.resume()
    resumed_from = state.step
    metrics_file = work_dir / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_metrics(metrics_file, state.step)
    if "cakld" in cfg.losses_used() and state.gamma is None:
        state.gamma = cfg.gamma if cfg.gamma is not None else run.estimate_gamma()
        log.info("CAKLD gamma = %.4f (teacher mean top-1 probability)", state.gamma)
    if state.step == 0:
        kl0 = run.heldout_kl() if cfg.eval_every else None  # collective: every process takes part
        if acc.is_main_process:
            _append_jsonl(metrics_file, {"step": 0, "heldout_kl": kl0})
    losses: list[float] = []
    bar = tqdm(total=run.total_steps, initial=state.step, desc=f"distill {cfg.loss}",
               disable=not (progress_enabled() and acc.is_main_process))
    window_t, window_tokens = time.perf_counter(), 0
    started = time.perf_counter()
    base_elapsed = state.elapsed_s
    for step in range(state.step, run.total_steps):
        metrics = run.train_step(step, state.gamma)
        state.step = step + 1
        state.consumed = state.step * cfg.grad_accum * cfg.batch_size * run.world
        state.tokens += int(metrics["input_tokens"])
        state.elapsed_s = base_elapsed + time.perf_counter() - started
        window_tokens += int(metrics["input_tokens"])
        losses.append(metrics["loss"])
        record = {"step": state.step, **metrics}
        if state.step % cfg.log_every == 0 or state.step == run.total_steps:
            now = time.perf_counter()
            record["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
            record["memory_mib"] = round(_memory_mib(run.device), 1)
            window_t, window_tokens = now, 0
        if cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == run.total_steps):
            record["heldout_kl"] = run.heldout_kl()
        if state.step % cfg.save_every == 0 or state.step == run.total_steps:
            run.save(state)
        if acc.is_main_process:
            _append_jsonl(metrics_file, record)
            if "tokens_per_s" in record:
                log.info("step %d/%d loss %.4f lr %.2e tok/s %.0f mem %.0f MiB%s", state.step, run.total_steps,
                         record["loss"], record["lr"], record["tokens_per_s"], record["memory_mib"],
                         f" heldout KL {record['heldout_kl']:.4f}" if record.get("heldout_kl") is not None else "")
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.1e}")
        if on_step is not None:
            on_step(record)
    bar.close()
    summary = {"steps": state.step, "tokens": state.tokens, "seconds": round(state.elapsed_s, 1),
               "final_loss": losses[-1] if losses else None, "gamma": state.gamma, "processes": run.world,
               "resumed_from": resumed_from, "teacher": run.teacher_name or BUNDLED_MODEL,
               "student_init": run.student_info.info, **run.scale_movement()}
    records = read_metrics(work_dir) if acc.is_main_process else []
    kls = [r["heldout_kl"] for r in records if r.get("heldout_kl") is not None]
    if kls:
        summary["heldout_kl_first"], summary["heldout_kl_last"] = kls[0], kls[-1]
    saved = None
    if out_dir is not None and acc.is_main_process:
        lm = run.student.lm
        lm.eval()
        pack_model(lm)
        extra = {"source_model": run.teacher_name or BUNDLED_MODEL, "training": summary}
        saved = save_quantized(lm, out_dir, run.tokenizer, method=METHOD, recipe={"method": METHOD, **cfg.to_dict()},
                               extra=extra)
        log.info("wrote the INT2 student to %s", saved)
    acc.wait_for_everyone()
    return TrainResult(saved, state.step, resumed_from, losses, summary)
