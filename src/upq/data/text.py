"""Text corpora for calibration, distillation and perplexity, plus token packing.

Sources understood by :func:`load_texts`:

* ``"wiki"`` -- the ~100 English Wikipedia articles bundled in gensim's test data (offline, see
  docs/design.md, Offline sources), markup stripped;
* a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (field ``"text"``);
* a Hugging Face dataset id ``name[:config]`` (needs the optional ``datasets`` package).

Splits are deterministic: each document goes to ``"train"`` or ``"heldout"`` by a stable hash of
its key (the article title for the wiki, the text itself for local files), ~85 / 15, so held-out
perplexity is measured on documents never used for calibration or training. ``"all"`` returns
every document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from upq.assets import ENWIKI_DUMP, cache_dir, get_asset
from upq.atomic import write_text_atomic
from upq.data.wikitext import iter_pages, strip_markup

__all__ = [
    "SPLITS",
    "HELDOUT_PERCENT",
    "load_texts",
    "split_of",
    "pack_token_ids",
    "token_blocks",
]

SPLITS = ("train", "heldout", "all")
HELDOUT_PERCENT = 15
MIN_WIKI_CHARS = 1500  # shorter pages are stubs / disambiguation lists
_SPLIT_ALIASES = {"test": "heldout", "eval": "heldout", "validation": "heldout"}


def split_of(key: str) -> str:
    """``"train"`` or ``"heldout"`` for a document key, via a stable (sha256) hash."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _norm_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _select(docs: Iterable[tuple[str, str]], split: str) -> list[str]:
    """Texts of ``(key, text)`` pairs belonging to ``split``."""
    return [text for key, text in docs if split == "all" or split_of(key) == split]


@functools.lru_cache(maxsize=1)
def _wiki_documents() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of the bundled wiki articles, redirects / stubs / disambiguations out.

    Parsing takes a few seconds, so the result is cached as JSON under ``$UPQ_CACHE/text``,
    keyed by a hash of the parser's source (editing the parser invalidates it).
    """
    from upq.data import wikitext

    parser = Path(wikitext.__file__).read_bytes() + Path(__file__).read_bytes()
    tag = hashlib.sha256(parser).hexdigest()[:12]
    cached = cache_dir() / "text" / f"wiki-{ENWIKI_DUMP.package}-{ENWIKI_DUMP.version}-{tag}.json"
    if cached.is_file():
        try:
            return tuple((k, v) for k, v in json.loads(cached.read_text(encoding="utf-8")))
        except (ValueError, OSError):
            pass  # unreadable cache: parse again
    docs = _parse_wiki()
    write_text_atomic(cached, json.dumps(docs, ensure_ascii=False))
    return tuple(docs)


def _parse_wiki() -> list[tuple[str, str]]:
    docs = []
    for page in iter_pages(get_asset(ENWIKI_DUMP)):
        if "(disambiguation)" in page.title.lower():
            continue
        low = page.wikitext.lower()
        if "{{disambig" in low or "{{dab" in low:
            continue
        text = strip_markup(page.wikitext)
        if len(text) >= MIN_WIKI_CHARS:
            docs.append((page.title, text))
    return docs


def _txt_documents(path: Path) -> list[tuple[str, str]]:
    raw = path.read_text(encoding="utf-8")
    blocks = [b.strip() for b in raw.replace("\r\n", "\n").split("\n\n")]
    return [(b, b) for b in blocks if b]


def _jsonl_documents(path: Path) -> list[tuple[str, str]]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row:
                raise ValueError(f"{path}:{lineno}: JSON line has no 'text' field")
            text = str(row["text"]).strip()
            if text:
                docs.append((text, text))
    return docs


def _hf_texts(spec: str, split: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"text source {spec!r} looks like a Hugging Face dataset id, which needs the "
            "'datasets' package (pip install datasets); or pass 'wiki' or a local .txt/.jsonl file"
        ) from None
    name, _, config = spec.partition(":")
    available = datasets.get_dataset_split_names(name, config or None)
    if split == "heldout":
        choice = next((s for s in ("validation", "test") if s in available), None)
    elif split == "all":
        choice = "+".join(available)
    else:
        choice = split if split in available else None
    if choice is None:
        raise ValueError(f"dataset {spec!r} has no split for {split!r} (it has {available})")
    ds = datasets.load_dataset(name, config or None, split=choice)
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def load_texts(source: str = "wiki", split: str = "train") -> list[str]:
    """Documents of ``source`` in ``split`` (``"train"``, ``"heldout"`` or ``"all"``).

    See the module docstring for the sources. A path-like source that does not exist raises
    ``FileNotFoundError``; Hugging Face datasets keep their own splits (``heldout`` maps to
    ``validation`` or ``test``).
    """
    split = _norm_split(split)
    if source == "wiki":
        return _select(_wiki_documents(), split)
    path = Path(source).expanduser()
    if path.suffix in {".txt", ".jsonl", ".json"} or path.exists() or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise FileNotFoundError(f"text source file not found: {path}")
        if path.suffix == ".jsonl":
            return _select(_jsonl_documents(path), split)
        if path.suffix == ".txt":
            return _select(_txt_documents(path), split)
        raise ValueError(f"unsupported text file type {path.suffix!r} ({path}); use .txt or .jsonl")
    return _hf_texts(source, split)


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; pass sep_id explicitly")
    return int(eos)


def pack_token_ids(
    texts: Sequence[str], tokenizer, *, sep_id: int | None = None, max_tokens: int | None = None
) -> torch.LongTensor:
    """Tokenize ``texts`` and join them into one 1-D stream, ``sep_id`` (default eos) after each.

    Stops tokenizing once ``max_tokens`` tokens are collected (the result is cut to that length).
    """
    sep = _eos_id(tokenizer) if sep_id is None else int(sep_id)
    ids: list[int] = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.extend(enc)
        ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    texts: Sequence[str],
    tokenizer,
    seq_len: int,
    n_blocks: int | None = None,
    *,
    sep_id: int | None = None,
) -> torch.LongTensor:
    """Pack ``texts`` (joined with eos) into a ``[n, seq_len]`` tensor of consecutive blocks.

    Takes the first ``n_blocks`` blocks in document order (all full blocks when None); the
    trailing partial block is dropped. Warns when fewer than ``n_blocks`` blocks are available.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if n_blocks is not None and n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1 or None, got {n_blocks}")
    cap = None if n_blocks is None else n_blocks * seq_len
    ids = pack_token_ids(texts, tokenizer, sep_id=sep_id, max_tokens=cap)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"not enough text for one block of {seq_len} tokens (got {ids.numel()} tokens)"
        )
    if n_blocks is not None and n < n_blocks:
        warnings.warn(f"only {n} blocks of {seq_len} tokens available (asked for {n_blocks})")
    return ids[: n * seq_len].view(n, seq_len)
