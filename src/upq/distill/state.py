"""Training checkpoints of Distill-QAT: written atomically, one directory per step.

``work_dir/step-00000100/`` holds the trainable student tensors (``trainable.safetensors``),
the optimizer and scheduler states, the RNG states of every process and ``state.json`` (step,
data position, CAKLD gamma, run fingerprint, counters). ``work_dir/latest.json`` names the
newest complete checkpoint; it is replaced only after that checkpoint is fully on disk, so a
crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, write_json_atomic

LATEST = "latest.json"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"


class CheckpointWriteError(RuntimeError):
    """A training checkpoint could not be written; the previous one is still the newest."""


class ResumeError(RuntimeError):
    """A work directory cannot be resumed (other run, or damaged)."""


@dataclass
class TrainState:
    """Counters of a run that a checkpoint restores."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0
    gamma: float | None = None
    elapsed_s: float = 0.0
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """RNG states of this process (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(work_dir: Path, step: int) -> Path:
    """Directory of the checkpoint taken after ``step`` optimizer steps."""
    return work_dir / f"step-{step:08d}"


def save_checkpoint(work_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: Any,
                    scheduler: Any, rng_states: list[dict[str, Any]], keep: int = 1) -> Path:
    """Write a checkpoint atomically, point ``latest.json`` at it, drop all but the ``keep`` newest.
    A failed write (a full disk, typically) raises :class:`CheckpointWriteError` and leaves the
    previous checkpoint as the newest."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = step_dir(work_dir, state.step)
    try:
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / TRAINABLE)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            (tmp / STATE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
        write_json_atomic(work_dir / LATEST, {"step": state.step, "dir": target.name})
    except (OSError, RuntimeError) as exc:  # torch.save reports a short write as a RuntimeError
        free = shutil.disk_usage(work_dir).free / 2**20
        raise CheckpointWriteError(
            f"could not write the step-{state.step} checkpoint in {work_dir} ({free:.0f} MiB free there): "
            f"{str(exc).strip() or type(exc).__name__}. The previous checkpoint is intact: free some space and "
            "re-run the same command to resume from it."
        ) from exc
    old = sorted(p for p in work_dir.glob("step-*") if p.is_dir() and p != target)
    for path in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return target


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of ``work_dir``, or None."""
    pointer = work_dir / LATEST
    if pointer.is_file():
        path = work_dir / json.loads(pointer.read_text())["dir"]
        if (path / STATE).is_file():
            return path
    candidates = sorted(p for p in work_dir.glob("step-*") if (p / STATE).is_file()) if work_dir.is_dir() else []
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path, fingerprint: str) -> tuple[TrainState, dict[str, torch.Tensor], Any, Any, list[dict[str, Any]]]:
    """(state, trainable tensors, optimizer state, scheduler state, RNG states) of checkpoint ``path``."""
    try:
        state = TrainState(**json.loads((path / STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ResumeError(f"cannot read {path / STATE}: {exc}") from exc
    if state.fingerprint != fingerprint:
        raise ResumeError(
            f"{path} belongs to a different run (other model, data or settings); "
            "delete the work directory or choose another --work-dir"
        )
    trainable = load_file(path / TRAINABLE)
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    scheduler = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    return state, trainable, optimizer, scheduler, rng
