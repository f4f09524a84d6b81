"""The docs site builds without a broken link, and the code blocks it marks to run do run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import containers_of

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runs: tests/test_docs.py -->"


def marked_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```python block right after the marker."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        for match in re.finditer(re.escape(MARK) + r"\n```python\n(.*?)```", text, re.S):
            found.append((page.name, match.group(1)))
    return found


def test_the_docs_build_with_no_broken_link(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_some_blocks_are_marked_to_run():
    assert {page for page, _ in marked_blocks()} >= {"usage.md", "lifecycle.md"}


@pytest.mark.parametrize("page, code", marked_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_a_marked_block_runs_as_written(page, code, ray_address, image, tmp_path, docker_client):
    env = {**os.environ, "RAY_ADDRESS": ray_address, "HOME": str(tmp_path)}
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        env["RAY_AUTH_TOKEN"] = token.read_text().strip()
    # As written; then the pool it made goes (a block that shut it down already is left alone).
    epilogue = "\ntry:\n    pool.shutdown()\nexcept NameError:\n    pass\n"
    ran = subprocess.run([sys.executable, "-c", code + epilogue], capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert containers_of(docker_client, "sandbox-pool") == []
