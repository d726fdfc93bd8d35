"""Recipes: nested dataclasses filled from a YAML file plus ``key=value`` overrides.

``load_recipe(PretrainRecipe, "recipes/pretrain/x.yaml", ["optim.lr=1e-3", "model.size=S"])`` returns a
fully typed recipe. Unknown keys are an error naming the key and its nearest valid spelling, so a typo
never silently falls back to a default. Every numeric field declares its valid range where it is defined
(:func:`bounded`); a value outside it is a one-line :class:`RecipeError` naming the dotted key, the value and
what is allowed, raised while the recipe loads, before any data is read or any folder is made.

One address per setting: a key that moved, or that is another setting's second address (a recipe class's
``MOVED = {old dotted key: where to set it}``, e.g. ``stream.seed`` -> ``seed``), is a one-line error naming
the one address; a key the running command does not use (``UNUSED = {dotted key: why}``, e.g. an eval crop
in pretraining) is a one-line error naming the command (``COMMAND``). ``recipe_to_dict`` gives the resolved
recipe to save with a run, without those keys; :func:`recipe_changes` lists how two resolved recipes differ.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mgfm.errors import MgfmError
from mgfm.files import TextFileError, read_text, write_atomic

T = TypeVar("T")


class RecipeError(MgfmError, ValueError):
    """A recipe file or override that does not fit the recipe's fields."""


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric recipe field (each element of a list or tuple of numbers): ``ge`` / ``gt``
    a lower bound (inclusive / exclusive), ``le`` / ``lt`` an upper one. None (an unset optional) is always
    allowed."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"a value in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1]}"

    def violations(self, value: Any) -> list:
        """The numbers in ``value`` (a number, or a list / tuple of them) outside the range."""
        items = value if isinstance(value, (list, tuple)) else [value]
        return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in self]


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its valid range (see :class:`Bounds`), e.g. ``mask_ratio: float = bounded(0.9,
    gt=0, lt=1)``; :func:`load_recipe` checks it."""
    bounds = Bounds(ge, gt, le, lt)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get("bounds")


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
        if loaded is None:  # an empty or comment-only file: running on built-in defaults would hide the mistake
            raise RecipeError(f"{path}: the recipe file is empty (no keys); write the keys to set, or leave "
                              f"--recipe out to run the default recipe")
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
        data = loaded
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(value) if value.strip() else "")
    where = str(path) if path else "recipe"
    _check_addresses(cls, data, where)
    return _build(cls, data, where=where, prefix="")


def _check_addresses(cls: type, data: dict, where: str) -> None:
    """A one-line error for a given key that is another setting's second address or that the command the
    recipe is for does not use (``cls.MOVED`` / ``cls.UNUSED``, dotted keys)."""
    moved, unused = getattr(cls, "MOVED", {}), getattr(cls, "UNUSED", {})
    for key in _flat(cls, data):
        if "." in key and key in moved:
            raise RecipeError(f"{where}: {key} has moved: set {moved[key]} instead")
        if key in unused:
            raise RecipeError(f"{where}: {key} is not used by {getattr(cls, 'COMMAND', cls.__name__)} ({unused[key]}); "
                              f"remove it")


def _flat(cls: type, data: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of recipe data for the recipe class ``cls``: sections (dataclass fields) are
    walked into, any other value (a mapping-valued setting too) is one key."""
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        section = hints.get(key)
        if isinstance(value, dict) and section is not None and dataclasses.is_dataclass(section):
            out.update(_flat(section, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_to_dict(recipe: Any) -> dict:
    """The resolved recipe as plain YAML-ready data (tuples become lists), without the keys its command does
    not take (``MOVED`` second addresses and ``UNUSED`` keys): loading it back gives the same recipe."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = plain(dataclasses.asdict(recipe))
    cls = type(recipe)
    for key in [*getattr(cls, "MOVED", {}), *getattr(cls, "UNUSED", {})]:
        *sections, last = key.split(".")
        node = data
        for part in sections:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return data


def recipe_changes(saved: dict, recipe: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose value in ``recipe`` differs from the ``saved`` resolved recipe (a run's
    ``recipe.yaml``), leaving out ``allowed`` keys and sections (``"stream.num_workers"``, ``"optim"``). A key
    ``saved`` lacks (a recipe written before the key existed) counts as its default."""
    cls = type(recipe)
    now = _flat(cls, recipe_to_dict(recipe))
    before = _flat(cls, saved)
    defaults = _flat(cls, recipe_to_dict(cls())) if _constructible(cls) else {}
    changed = []
    for key, value in now.items():
        if any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        if before.get(key, defaults.get(key, value)) != value:
            changed.append(key)
    return changed


def _constructible(cls: type) -> bool:
    try:
        cls()
    except Exception:  # noqa: BLE001 - a recipe class without defaults for every field
        return False
    return True


def save_recipe(recipe: Any, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: dict, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: {prefix.rstrip('.') or 'recipe'}: expected a section (mapping) for "
                          f"{cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        moved = getattr(cls, "MOVED", {})
        if key not in fields and key in moved:
            raise RecipeError(f"{where}: {prefix}{key} has moved: set {prefix}{moved[key]} instead")
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {', '.join(fields)}"
            raise RecipeError(f"{where}: unknown key {prefix + key!r}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, where, f"{prefix}{key}.")
            continue
        kwargs[key] = _coerce(hints[key], value, f"{where}: {prefix}{key}")
        bounds = field_bounds(fields[key])
        if bounds is not None and bounds.violations(kwargs[key]):
            raise RecipeError(f"{where}: {prefix}{key}={_show(kwargs[key])}: expected {bounds}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
