"""Every numeric field of every recipe (pretraining, fine-tuning, each evaluator) has its valid range, and a
value outside it is a one-line RecipeError naming the dotted key, raised while the recipe loads."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from mgfm.config import Bounds, RecipeError, field_bounds, load_recipe
from mgfm.evaluate.emotion_eval import EmotionRecipe
from mgfm.evaluate.probe_eval import ProbeRecipe
from mgfm.evaluate.retrieval_eval import RetrievalRecipe
from mgfm.evaluate.finetune_recipe import FinetuneRecipe
from mgfm.train.recipe import PretrainRecipe

RECIPES = [PretrainRecipe, FinetuneRecipe, ProbeRecipe, RetrievalRecipe, EmotionRecipe]


def _numeric(hint) -> bool:
    if hint in (int, float):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType, list, tuple):
        return any(_numeric(a) for a in typing.get_args(hint) if a not in (type(None), Ellipsis))
    return False


def numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """``[(dotted key, field, type hint)]`` of every numeric field under ``cls``, sections included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += numeric_fields(hint, f"{prefix}{f.name}.")
        elif _numeric(hint):
            out.append((f"{prefix}{f.name}", f, hint))
    return out


def outside(bounds: Bounds, hint) -> float:
    """A value just outside ``bounds`` (below the lower bound, else above the upper one)."""
    integer = int in typing.get_args(hint) or hint is int or (
        typing.get_origin(hint) in (list, tuple) and int in typing.get_args(hint))
    if bounds.ge is not None:
        return bounds.ge - 1
    if bounds.gt is not None:
        return bounds.gt - (1 if integer else 0)  # the excluded bound itself
    return (bounds.le + 1) if bounds.le is not None else bounds.lt


def as_override(hint, value: float) -> str:
    """The out-of-range value in the field's shape: a list / tuple gets it as one element."""
    text = str(int(value)) if float(value).is_integer() else repr(float(value))
    origin = typing.get_origin(hint)
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (list, tuple) or (inner and typing.get_origin(inner[0]) in (list, tuple)):
        container = inner[0] if origin not in (list, tuple) else hint
        n = len([a for a in typing.get_args(container) if a is not Ellipsis]) if typing.get_origin(container) is tuple \
            and Ellipsis not in typing.get_args(container) else 1
        return "[" + ",".join([text] * n) + "]"
    return text


# keys a recipe does not take (another setting's second address, or unused by its command) are refused whatever
# their value (tests/test_long_run.py)
CASES = [(cls, key, f, hint) for cls in RECIPES for key, f, hint in numeric_fields(cls)
         if key not in {**getattr(cls, "MOVED", {}), **getattr(cls, "UNUSED", {})}]


@pytest.mark.parametrize("cls,key,f,hint", CASES, ids=[f"{c.__name__}.{k}" for c, k, _, _ in CASES])
def test_every_numeric_recipe_field_has_a_range_that_load_checks(cls, key, f, hint):
    bounds = field_bounds(f)
    assert bounds is not None, f"{cls.__name__}: {key} has no valid range (declare it with mgfm.config.bounded)"
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    assert not bounds.violations(default), f"{key}: the default {default} is outside {bounds}"
    value = outside(bounds, hint)
    with pytest.raises(RecipeError) as err:
        load_recipe(cls, None, [f"{key}={as_override(hint, value)}"])
    message = str(err.value)
    assert "\n" not in message and f"{key}=" in message and "expected" in message, message


@pytest.mark.parametrize("override,expected", [
    ("stream.decoder_keep_ratio=1.5", "stream.decoder_keep_ratio=1.5: expected a value in (0, 1]"),
    ("stream.mask_ratio=1.5", "stream.mask_ratio=1.5: expected a value in (0, 1)"),
    ("stream.mask_ratio=0", "stream.mask_ratio=0: expected a value in (0, 1)"),
    ("stream.mask_ratio=0.999", "stream.mask_ratio=0.999 hides 49 of the 49 patches of a frame"),
    ("stream.mask_ratio=0.001", "stream.mask_ratio=0.001 hides 0 of the 49 patches"),
    ("optim.betas=[0.9,1.2]", "optim.betas=[0.9, 1.2]: expected a value in [0, 1)"),
])
def test_mask_and_optimiser_values_that_cannot_train_are_recipe_errors(override, expected):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_recipe(PretrainRecipe, "recipes/pretrain/tiny_cpu.yaml", [override])


def test_bounds_say_what_is_allowed():
    assert str(Bounds(gt=0, lt=1)) == "a value in (0, 1)" and str(Bounds(ge=1)) == ">= 1"
    assert str(Bounds(ge=0, le=3)) == "a value in [0, 3]" and str(Bounds(gt=0)) == "> 0"
    assert Bounds(ge=0, lt=1).violations([0.5, 1.0, -1]) == [1.0, -1]
