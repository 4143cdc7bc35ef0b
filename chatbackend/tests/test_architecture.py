"""The apps import one way only (README, "Architecture"), checked by import-linter's contract in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run import-linter's ``lint-imports`` on the tree at ``cwd`` (its contract: pyproject.toml)."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([command, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_apps_import_downwards_only():
    result = _lint_imports()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    # A copy of the tree with one import against the direction: the contract must break.
    for name in ("chatbackend", "accounts", "llm", "conversations"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    keys = tmp_path / "accounts" / "keys.py"
    keys.write_text(keys.read_text() + "\nimport conversations.models  # noqa: E402, F401\n")

    result = _lint_imports(cwd=tmp_path)

    assert result.returncode != 0
    assert "accounts is not allowed to import conversations" in result.stdout
    assert "accounts.keys -> conversations.models" in result.stdout
