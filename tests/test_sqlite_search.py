"""Search's SQLite fallback, run in CI too (issue 11: "search finds a word in message content on
PostgreSQL and on SQLite").

CI's session database is PostgreSQL, where ``conversations/tests/test_search_organize.py`` exercises
the full-text search. This test runs that module's search tests again in a child pytest on the
embedded defaults (SQLite, no Redis), the configuration a laptop runs, so the fallback
(``conversations.search``) is tested on every CI run. On SQLite already, the module itself covers it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(connection.vendor == "sqlite", reason="the session database is SQLite: the module runs itself")
def test_search_tests_pass_on_sqlite(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_TASK_ALWAYS_EAGER"} and not key.startswith("PYTEST_")
    }
    env["SQLITE_TEST_DATABASE"] = str(tmp_path / "search.sqlite3")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "conversations/tests/test_search_organize.py",
            "-k",
            "search",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed is not None and int(passed.group(1)) >= 5, output[-2000:]
