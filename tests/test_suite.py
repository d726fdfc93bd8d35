"""The suite's own guard rails: a hung test fails by name within its timeout (pyproject's default, larger
ones only where a slow test declares it), and ``make test-quick`` leaves out exactly the tests marked slow."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_a_hung_test_fails_by_name_within_its_timeout(tmp_path):
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < int(options["timeout"]) <= 600, "a default per-test timeout, well below the CI budget"
    (tmp_path / "test_hang.py").write_text("import time\n\n\ndef test_waits_forever():\n    time.sleep(600)\n")
    # the repository's pytest settings, with the default timeout cut to 2 s for the check
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-o", "timeout=2", "-p", "no:cacheprovider", str(tmp_path / "test_hang.py")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "Timeout" in done.stdout and "FAILED" in done.stdout and "test_waits_forever" in done.stdout


def test_make_test_quick_deselects_the_slow_tests():
    makefile = (REPO / "Makefile").read_text()
    quick = makefile[makefile.index("\ntest-quick:"):].split("\n\n")[0]
    assert '-m "not slow"' in quick and "-m pytest" in quick
    whole = makefile[makefile.index("\ntest:"):].split("\n\n")[0]
    assert "-m pytest" in whole and "$(PYTEST_ARGS)" in whole and "not slow" not in whole
    # both run on pytest-xdist workers, the multi-process tests kept to one worker by their group
    assert all("--dist loadgroup" in target for target in (quick, whole))


def test_the_slow_tests_share_one_xdist_group_and_the_others_none(pytester):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_groups="""
import pytest

@pytest.mark.slow
def test_launches_ranks():
    pass

def test_quick():
    pass
""")
    items, _ = pytester.inline_genitems("-p", "no:cacheprovider")
    groups = {item.name: [m.args for m in item.iter_markers("xdist_group")] for item in items}
    assert groups == {"test_launches_ranks": [("multi_process",)], "test_quick": []}
