"""README.md is a user's manual: at most 12 KB (results and run times live in BENCHMARKS.md and docs/), and it
names every make verb."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 12 * 1024


def test_readme_is_a_manual_not_a_log():
    size = len((REPO / "README.md").read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes: move results and run times to BENCHMARKS.md or docs/"


def test_readme_names_every_make_verb():
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    readme = (REPO / "README.md").read_text()
    assert [verb for verb in phony if f"make {verb}" not in readme] == []
