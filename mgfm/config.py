"""Recipes: nested dataclasses filled from a YAML file plus ``key=value`` overrides.

``load_recipe(PretrainRecipe, "recipes/pretrain/x.yaml", ["optim.lr=1e-3", "model.size=S"])`` returns a
fully typed recipe. Unknown keys are an error naming the key and its nearest valid spelling, so a typo
never silently falls back to a default. ``recipe_to_dict`` gives the resolved recipe to save with a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mgfm.errors import MgfmError
from mgfm.files import TextFileError, read_text

T = TypeVar("T")


class RecipeError(MgfmError, ValueError):
    """A recipe file or override that does not fit the recipe's fields."""


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (dotted keys for nesting)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(read_text(path))
        except TextFileError as err:
            raise RecipeError(f"recipe {err}") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
        data = loaded or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return _build(cls, data, where=str(path) if path else "recipe")


def recipe_to_dict(recipe: Any) -> dict:
    """The resolved recipe as plain YAML-ready data (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    tmp.replace(path)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a section (mapping) for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(fields)}"
            raise RecipeError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{where}: {key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        items = [_coerce(item, v, where) if item else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except ValueError:
            pass
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
