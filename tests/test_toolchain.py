"""The suite's own toolchain: what ``make test`` relies on and a dependency bump could break."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path: Path) -> None:
    """The installation tests share one Prefect installation per worker only if
    ``--dist loadgroup`` sends a group to one worker; pytest 9 with pytest-xdist 3.8 silently
    does not (see pyproject.toml), which doubled the installations and hid it."""
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.xdist_group('shared')\n"
        + "".join(f"def test_g{n}():\n    pass\n" for n in range(6))
    )
    (tmp_path / "test_free.py").write_text(
        "".join(f"def test_f{n}():\n    pass\n" for n in range(6))
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-v",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", done.stdout)
    grouped = {(worker, test) for worker, test in ran if "test_grouped" in test}
    assert len(grouped) == 6, done.stdout
    assert all(test.endswith("@shared") for _, test in grouped), done.stdout
    assert len({worker for worker, _ in grouped}) == 1, done.stdout
