"""Commands a user could have typed before a module moved (research drivers out of the library, the one
raw-pixel reference, renames) end in one line naming the new command, exit code 2; importing them says the
same."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
MOVED = {
    "mgfm.real_motion": "python -m experiments.real_motion",
    "mgfm.evaluate.curve": "python -m experiments.curve",
    "mgfm.evaluate.pixel_baseline": "python eval/linear_probe.py",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_command_names_the_new_one(old):
    done = subprocess.run([sys.executable, "-m", old, "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err, err
    assert err.startswith(f"{old}: error: {old} has moved: ") and MOVED[old] in err
    with pytest.raises(ImportError, match="has moved"):
        importlib.import_module(old)


@pytest.mark.parametrize("new", ["experiments.real_motion", "experiments.curve"])
def test_the_research_drivers_run_from_the_repository_root(new):
    """As ``make real-motion`` runs them: ``python -m experiments.<name>`` from the repository root."""
    done = subprocess.run([sys.executable, "-m", new, "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"usage: {new}" in done.stdout, done.stderr
    assert "-m experiments.real_motion" in (REPO / "Makefile").read_text()
