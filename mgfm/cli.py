"""The one command-line shape of every mgfm entry script: ``[--recipe FILE] [key=value ...]``.

Errors a user can fix (:class:`mgfm.errors.MgfmError`: a recipe typo, a missing checkpoint or shard set,
features of the wrong width, a full disk; and a missing file) end in one ``<prog>: error: ...`` line and
exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn, TypeVar

from mgfm.config import load_recipe
from mgfm.errors import Interrupted, MgfmError
from mgfm.files import storage_cause
from mgfm.runtime import rank_world

T = TypeVar("T")


def user_errors() -> tuple[type[BaseException], ...]:
    """What an entry point reports as one line: the project's own errors and a missing file. Anything else
    (a ValueError from torch, sklearn or our own asserts included) is a bug: it keeps its traceback."""
    return MgfmError, FileNotFoundError


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Inside: a user error (:func:`user_errors`) or a full / read-only / forbidden disk ends the program with
    one ``<prog>: error: ...`` line and exit code 2, Ctrl-C with one line saying a rerun resumes (exit code
    130), a run stopped on a signal after its checkpoint (:class:`mgfm.errors.Interrupted`) with one line and
    its own exit code; any other exception keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:  # what was written is complete (atomic writes, checkpoints): a rerun resumes
        sys.stderr.write(f"\n{prog}: interrupted; rerun the same command to resume\n")
        raise SystemExit(130) from None
    except Interrupted as stop:  # stopped on a signal after a checkpoint (mgfm.train.stop): every rank did
        if rank_world()[0] == 0:
            sys.stderr.write(f"\n{prog}: {stop}\n")
        raise SystemExit(stop.exit_code) from None
    except user_errors() as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        raise SystemExit(2) from None
    except OSError as err:  # a full disk or a read-only folder anywhere: the path and the cause, in one line
        cause = storage_cause(err, err.filename)
        if cause is None:
            raise
        sys.stderr.write(f"{prog}: error: cannot write {err.filename or '?'}: {cause}\n")
        raise SystemExit(2) from None


def run_cli(recipe_cls: type[T], action: Callable[[T], object], argv: list[str] | None, prog: str,
            description: str, default_recipe: Path | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--recipe", type=Path, default=None,
                        help=f"YAML recipe (default: {default_recipe or 'built-in defaults'})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (e.g. probe.epochs=50)")
    args = parser.parse_args(argv)
    recipe_path = args.recipe or (default_recipe if default_recipe and default_recipe.exists() else None)
    with one_line_errors(prog):
        recipe = load_recipe(recipe_cls, recipe_path, args.overrides)
        return action(recipe)


def moved_command(old: str, where: str, name: str) -> NoReturn:
    """What is left of a command that moved: ``python -m <old>`` (``name == "__main__"``) ends in one line,
    ``<old>: error: <old> has moved: <where>``, and exit code 2; an import of ``old`` raises ``ImportError``
    saying the same. A moved module's whole body is ``moved_command("<old>", "run `...` instead", __name__)``."""
    message = f"{old} has moved: {where}"
    if name == "__main__":
        sys.stderr.write(f"{old}: error: {message}\n")
        raise SystemExit(2)
    raise ImportError(message)
