"""The code stays formatted and lint-clean: ruff, with the settings in pyproject.toml (line length 120)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_finds_nothing_to_change(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: ./install.sh --test installs it")
    result = subprocess.run([ruff, *command], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
