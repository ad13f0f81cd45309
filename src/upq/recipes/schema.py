"""Recipe schema: YAML -> validated stage configs, with budgets and command-line overrides.

A recipe has ``name``, ``description``, ``stages`` (a list; each item names its ``stage`` kind and
sets fields of that kind's config dataclass) and ``budgets`` (``cpu`` / ``cpu-long`` / ``gpu``: per
stage kind, fields that override the stage; ``cpu-long`` starts from ``cpu``'s settings). Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..grids import parse_group_size
from ..stages import stage_kinds

RECIPE_DIR = Path(__file__).parent
TOP_LEVEL = {"name", "description", "stages", "budgets"}
BUDGETS = ("cpu", "cpu-long", "gpu")
BUDGET_BASE = {"cpu-long": "cpu"}  # a budget starts from this one's settings, then applies its own


class RecipeError(ValueError):
    """A recipe file or override is malformed; the message names the offending key."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML with the 1.2 booleans: only ``true`` / ``false``, so ``mixed_precision: no`` stays the
    string ``"no"`` instead of YAML 1.1's ``False``."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def stage_classes() -> dict[str, type]:
    """Stage kind -> config dataclass, from the stage registry (:mod:`upq.stages`)."""
    return {name: kind.config for name, kind in stage_kinds().items()}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted/validated against annotation ``tp``; raise RecipeError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: got {value!r}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return validate_fields(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def validate_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``data`` against the fields of dataclass ``cls``; return converted values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in names:
            raise RecipeError(f"{where}.{key}: unknown key; valid keys: {', '.join(sorted(names))}")
        if key == "group_size":
            value = parse_group_size(value)
        out[key] = _check_value(value, hints[key], f"{where}.{key}")
    return out


@dataclass
class Stage:
    """One validated stage: its kind and its config object."""

    kind: str
    config: Any


@dataclass
class Recipe:
    """A validated recipe with its budget applied."""

    name: str
    description: str
    stages: list[Stage]
    budget: str
    source: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A plain-data form for provenance (stored in the output checkpoint)."""
        return {"name": self.name, "description": self.description, "budget": self.budget,
                "stages": [{"stage": s.kind, **dataclasses.asdict(s.config)} for s in self.stages]}


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with upq."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_recipe_file(name_or_path: str) -> dict[str, Any]:
    """Raw YAML of a shipped recipe name or a file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {name_or_path!r}: not a file and not one of {builtin_recipes()}")
    data = _load_yaml(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stage.key=value`` (value in YAML syntax) -> (["stage", "key"], value)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like STAGE.KEY=VALUE, e.g. distill.beta=0.3")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise RecipeError(f"override {text!r}: name the stage kind first, e.g. ptq.samples=64")
    if raw.strip().startswith("@"):  # a placeholder such as @previous (YAML reserves '@')
        return parts, raw.strip()
    try:
        return parts, _load_yaml(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from exc


def override_items(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[list[str], Any]]:
    """(key path, value) of each override: ``["stage.key=value", ...]`` or ``{"stage.key": value}``."""
    if not isinstance(overrides, Mapping):
        return [parse_override(text) for text in overrides or []]
    items = []
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) < 2:
            raise RecipeError(f"override key {key!r}: name the stage kind first, e.g. ptq.samples")
        items.append((parts, value))
    return items


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(name_or_path: str, budget: str = "cpu",
                overrides: Mapping[str, Any] | Sequence[str] | None = None, add_stages: Sequence[str] = ()) -> Recipe:
    """Read, append ``add_stages`` (stage kinds, with their defaults), apply the ``budget`` preset and
    ``overrides``, validate and build the stage configs."""
    raw = read_recipe_file(name_or_path)
    if add_stages:
        raw = {**raw, "stages": [*(raw.get("stages") or []), *({"stage": kind} for kind in add_stages)]}
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise RecipeError(f"{sorted(unknown)[0]}: unknown top-level key; valid keys: {', '.join(sorted(TOP_LEVEL))}")
    if budget not in BUDGETS:
        raise RecipeError(f"budget must be one of {BUDGETS}, got {budget!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError("stages: a recipe needs a non-empty list of stages")
    budgets = raw.get("budgets") or {}
    if not isinstance(budgets, dict) or set(budgets) - set(BUDGETS):
        raise RecipeError(f"budgets: only {BUDGETS} are allowed, got {sorted(budgets) if isinstance(budgets, dict) else budgets}")
    base = BUDGET_BASE.get(budget)
    patches: dict[str, dict[str, Any]] = _merge(budgets.get(base) or {} if base else {}, budgets.get(budget) or {})
    for parts, value in override_items(overrides):
        node = patches.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    classes = stage_classes()
    kinds = [s.get("stage") if isinstance(s, dict) else None for s in stages_raw]
    for kind in patches:
        if kind not in kinds:
            raise RecipeError(f"{kind}: override/budget for a stage this recipe does not have (stages: {kinds})")
    stages = []
    for index, item in enumerate(stages_raw):
        where = f"stages[{index}]"
        if not isinstance(item, dict) or item.get("stage") not in classes:
            raise RecipeError(f"{where}.stage: must be one of {sorted(classes)}")
        kind = item["stage"]
        body = _merge({k: v for k, v in item.items() if k != "stage"}, patches.get(kind, {}))
        cls = classes[kind]
        values = validate_fields(cls, body, f"{where}({kind})")
        recipe_defaults = stage_kinds()[kind].recipe_defaults
        if recipe_defaults is not None:
            recipe_defaults(values)
        try:
            stages.append(Stage(kind, cls(**values)))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}({kind}): {exc}") from exc
    return Recipe(str(raw.get("name", Path(name_or_path).stem)), str(raw.get("description", "")), stages, budget, raw)
