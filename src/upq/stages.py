"""The stage registry: a recipe stage kind is one config dataclass plus one ``run(config, context)``.

The module that owns a method registers its stage (``register_stage``) next to its config and
code: RTN in ``ptq/rtn.py``, the clipping search in ``ptq/clip.py``, block-wise PTQ and the INT2
block stage in ``ptq/blockwise.py``, Distill-QAT in ``distill/stage.py``. The recipe schema reads
the configs from here and the pipeline runs any registered kind the same way, so a new stage is
one new module (and, outside the built-ins, an import before the recipe is loaded).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PREVIOUS = "@previous"  # a field that takes the previous stage's checkpoint (or block work directory)
BUILTIN_STAGE_MODULES = ("upq.ptq.rtn", "upq.ptq.clip", "upq.ptq.blockwise", "upq.ptq.head", "upq.distill.stage")
PRODUCTS = ("checkpoint", "float_model")


@dataclass
class StageContext:
    """What a stage gets from the pipeline: the models so far and where to write."""

    model: str | None  # the original model (None: the bundled one)
    float_model: str | None  # the float model later stages start from (the original, or a clip stage's output)
    checkpoint: Path | None  # the last quantized checkpoint, if any
    latent: Path | None  # the work directory of the last block stage, while its checkpoint is the last
    stage_dir: Path
    device: str = "cpu"

    @property
    def out(self) -> Path:
        """Where the stage writes its product."""
        return self.stage_dir / "out"

    def previous(self, value: str | None, what: str, kind: str) -> str | None:
        """``value``, with the ``@previous`` placeholder replaced by the last checkpoint (or block work directory)."""
        if value != PREVIOUS:
            return value
        found = self.latent if what == "latent" else self.checkpoint
        if found is None:
            source = "a block-wise (ptq / int2-blocks) stage" if what == "latent" else "a stage that makes a checkpoint"
            raise ValueError(f"{kind} takes its {what} from the previous stage, but the previous stage is not {source}")
        return str(found)


@dataclass(frozen=True)
class StageKind:
    """One stage kind: its config dataclass, how to run it, and what it leaves for the next stages.

    ``produces``: ``checkpoint`` (a packed upq checkpoint in ``context.out``) or ``float_model``
    (a plain transformers model later stages quantize). ``latent_dir``: the sub-directory of the
    stage directory holding latent float weights (block stages), or None. ``recipe_defaults`` fills
    a stage's recipe values before validation (e.g. ``@previous`` for the checkpoint it starts from).
    """

    name: str
    config: type
    run: Callable[[Any, StageContext], dict[str, Any]]
    produces: str = "checkpoint"
    latent_dir: str | None = None
    recipe_defaults: Callable[[dict[str, Any]], None] | None = None


_REGISTRY: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add a stage kind (a kind's module may be imported twice: the same name is replaced)."""
    if kind.produces not in PRODUCTS:
        raise ValueError(f"stage {kind.name!r}: produces must be one of {PRODUCTS}, got {kind.produces!r}")
    _REGISTRY[kind.name] = kind
    return kind


def stage_kinds() -> dict[str, StageKind]:
    """Every registered stage kind, the built-in ones imported on first use."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)
