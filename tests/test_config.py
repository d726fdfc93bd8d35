"""Recipes: YAML + overrides into typed dataclasses, typos named with their nearest valid key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from mgfm.config import RecipeError, load_recipe, recipe_to_dict, save_recipe


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = 1


@dataclass
class Recipe:
    name: str = "run"
    optim: Optim = field(default_factory=Optim)
    decoder_keep: float | None = None
    flip: bool = False
    mode: str = "train"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: base\noptim:\n  lr: 1.5e-4\n  betas: [0.8, 0.9]\n")
    recipe = load_recipe(Recipe, path, ["optim.warmup_epochs=3", "decoder_keep=0.5", "flip=true", "optim.lr=1e-3"])
    assert recipe.name == "base" and recipe.optim.lr == 1e-3 and recipe.optim.betas == (0.8, 0.9)
    assert recipe.optim.warmup_epochs == 3 and recipe.decoder_keep == 0.5 and recipe.flip is True
    save_recipe(recipe, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == recipe_to_dict(recipe)
    assert load_recipe(Recipe, tmp_path / "resolved.yaml") == recipe


def test_defaults_without_file():
    assert load_recipe(Recipe) == Recipe()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ("nmae=x", "did you mean 'name'"),
        ("optim.warmup_epochs=1.5", "expected an integer"),
        ("flip=maybe", "expected true/false"),
        ("optim.betas=[1]", "expected 2 values"),
        ("optim=3", "expected a section"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_overrides_are_one_clear_line(override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")) as err:
        load_recipe(Recipe, None, [override])
    assert "\n" not in str(err.value)


def test_typo_in_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  warmup_epoch: 2\n")
    with pytest.raises(RecipeError, match=r"r.yaml: unknown key 'optim.warmup_epoch'; did you mean 'optim.warmup_epochs'"):
        load_recipe(Recipe, path)


# ------------------------------------------------------------------------------------- the CLI shape


def _cli(action, argv: list[str]):
    from mgfm.cli import run_cli

    return run_cli(Recipe, action, argv, "prog", "a test entry")


def test_a_bug_keeps_its_traceback_but_user_errors_are_one_line(tmp_path, capsys):
    def shape_bug(recipe):
        import torch

        return torch.zeros(2, 3) @ torch.zeros(2, 3)  # what an internal shape bug raises

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _cli(shape_bug, [])

    def value_bug(recipe):
        raise ValueError("an internal assertion, not the user's doing")

    with pytest.raises(ValueError, match="internal assertion"):
        _cli(value_bug, [])

    from mgfm.sources.generic_csv import read_csv_index

    bad_csv = tmp_path / "clips.csv"
    bad_csv.write_text("path,label,subject,split\na.mp4,0,s1,holdout\n")
    for action, argv, expected in [
        (lambda r: None, ["optim.lr=fast"], "prog: error: recipe: optim.lr: expected a number, got 'fast'"),
        (lambda r: read_csv_index(bad_csv), [], f"prog: error: {bad_csv}:2 field 'split': unknown split 'holdout'"),
        (lambda r: open(tmp_path / "missing.yaml").read(), [], "prog: error: [Errno 2] No such file or directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _cli(action, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err


@pytest.mark.parametrize("override, message", [("optim.base_lr=0", "optim.base_lr=0: expected > 0"),
                                               ("optim.min_lr=-1e-6", "optim.min_lr=-1e-06: expected >= 0"),
                                               ("optim.epochs=0", "optim.epochs=0: expected >= 1")])
def test_a_pretraining_schedule_that_cannot_run_is_one_line(override, message):
    """base_lr=0 used to reach the scheduler and die there with a ZeroDivisionError traceback."""
    from mgfm.errors import MgfmError
    from mgfm.train.recipe import PretrainRecipe

    with pytest.raises(MgfmError, match=message.replace(".", r"\.")) as err:
        load_recipe(PretrainRecipe, None, [override])
    assert "\n" not in str(err.value)
