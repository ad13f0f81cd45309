"""CLI flags that set config-dataclass fields: their defaults come from the dataclass, and the
parsed flags build the config, so a default lives in one place.

A field map sends each flag's ``dest`` to one or more dotted field paths (``data.chat.top_p``);
a path starting with ``!`` is a boolean the ``store_true`` flag switches off (``--no-mask-prompt``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from .grids import parse_group_size

FieldMap = dict[str, tuple[str, ...]]


def field_default(cls: type, path: str) -> Any:
    """The default of the (dotted, nested) dataclass field ``path`` of ``cls``."""
    owner: Any = cls
    value: Any = None
    for part in path.lstrip("!").split("."):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if part not in fields:
            raise KeyError(f"{getattr(owner, '__name__', type(owner).__name__)} has no field {part!r}")
        f = fields[part]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        owner = value
    return value


def as_flag(path: str, value: Any) -> Any:
    """A field value as the flag shows it: ``channel`` for a per-row group, comma lists for tuples."""
    if path.startswith("!"):
        return False
    if path.endswith("group_size"):
        return "channel" if value is None else str(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def flag_default(cls: type, fields: FieldMap, dest: str) -> Any:
    """The default of the flag ``dest``: its (first) field's dataclass default, as the flag shows it."""
    path = fields[dest][0]
    return as_flag(path, field_default(cls, path))


def field_flag_adder(parser: Any, cls: type, fields: FieldMap) -> Callable[..., None]:
    """An ``add_argument`` for ``parser`` whose flags default to their ``cls`` field (``store_true`` flags: False)."""

    def add(flag: str, dest: str | None = None, **kw: Any) -> None:
        dest = dest or flag.lstrip("-").replace("-", "_")
        if kw.get("action") != "store_true":
            kw["default"] = flag_default(cls, fields, dest)
        parser.add_argument(flag, dest=dest, **kw)

    return add


def _from_flag(path: str, value: Any) -> Any:
    if path.startswith("!"):
        return not value
    if path.endswith("group_size"):
        return parse_group_size(value)
    if path.endswith("train") and isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return value


def config_from_args(cls: type, fields: FieldMap, args: argparse.Namespace, **fixed: Any) -> Any:
    """Build ``cls`` from the parsed flags in ``fields`` (nested dicts for dotted paths) plus ``fixed`` values."""
    values: dict[str, Any] = {}
    for dest, paths in fields.items():
        for path in paths:
            node = values
            *parents, leaf = path.lstrip("!").split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _from_flag(path, getattr(args, dest))
    values.update(fixed)
    return cls(**values)
