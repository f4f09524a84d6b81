"""Our glob and grep answer as deer-flow's own search helpers do, on one tree of hostile names.

deer-flow's ``find_glob_matches`` and ``find_grep_matches`` run on the host directory; our
sandbox's ``glob`` and ``grep`` run inside the sandbox on the same directory, mounted at
``/mnt/user-data/workspace``. Their answers must be equal (paths mapped, order, truncation
flags, errors included).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deerflow.sandbox.search import find_glob_matches, find_grep_matches
from deerflow.sandbox.sandbox_provider import get_sandbox_provider

VIRTUAL = "/mnt/user-data/workspace"

TREE = {
    "a.py": "needle\n",
    "src/b.py": "x\nNeedle here\n",
    "src/deep/er/c.py": "def f():\n    return 'needle'\n",
    "src/[x].py": "needle in brackets\n",
    "src/with space.py": "needle with space\n",
    "src/-dash.py": "needle\n",
    "src/é-unicode.md": "NEEDLE unicode\n",
    "src/new\nline.py": "needle newline name\n",
    "src/star*.py": "needle star\n",
    ".hidden/h.py": "needle hidden\n",
    ".env.example": "needle=1\n",
    "node_modules/dep/index.js": "needle\n",
    ".git/config": "needle\n",
    "build/out.py": "needle\n",
    "dist/x.py": "needle\n",
    "pkg.egg-info/PKG-INFO": "needle\n",
    "notes.log": "needle\n",
    "backup.py~": "needle\n",
    ".DS_Store": "needle\n",
    "docs/readme.md": "needle\n" + "long " * 500 + "needle\n" + "x" * 250 + " needle\n",
    "docs/crlf.txt": "one\r\nneedle\r\nthree\rneedle\r",
    "docs/many.txt": "".join(f"needle {i}\n" for i in range(40)),
    "data/blob.bin": "needle\0binary\n",
    "data/big.txt": "needle\n" + "y" * 1_100_000,
    "data/latin1.txt": "caf\xe9 needle\n",
}
BYTES_NAMES = {b"src/bad-\xff-name.py": b"needle bytes name\n"}
GLOBS = ["**/*.py", "*.py", "src/*.py", "src/**", "**", "*", "**/deep/**/*.py", "[[]x].py", "*.md", "**/*.MD",
         ".*", "**/.*", "src/with space.py", "docs/*", "**/*~", "*.log", "**/index.js", "/abs/*.py", "star*.py"]
GREPS = [("needle", {}), ("NEEDLE", {"case_sensitive": True}), ("needle", {"glob": "**/*.py"}),
         ("needle", {"glob": "*.md"}), ("n.edle", {"literal": True}), ("n.edle", {}), ("^needle$", {}),
         ("needle", {"max_results": 5}), ("needle \\d+", {"max_results": 40}), ("café", {}), ("return", {}),
         ("x{200}", {})]


def _tree(root: Path) -> None:
    for relative, text in TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1") if "latin1" in relative else text.encode())
    for relative, data in BYTES_NAMES.items():
        with open(os.path.join(os.fsencode(root), relative), "wb") as handle:
            handle.write(data)
    (root / "src" / "link-to-a.py").symlink_to("../a.py")
    (root / "linked-dir").symlink_to("src/deep")
    (root / "dangling.py").symlink_to("/nonexistent-target/x.py")


@pytest.fixture
def searched(deerflow):
    provider = get_sandbox_provider()
    sandbox = provider.get(provider.acquire("chat-search", user_id="alice"))
    root = deerflow.paths().sandbox_work_dir("chat-search", user_id="alice").resolve()
    _tree(root)
    return sandbox, root


def _virtual(root: Path, path: str) -> str:
    return VIRTUAL + path[len(str(root)):] if path.startswith(str(root)) else path


@pytest.mark.parametrize("include_dirs", [False, True])
def test_glob_answers_as_deer_flow_s_find_glob_matches(searched, include_dirs):
    sandbox, root = searched
    for pattern in GLOBS:
        for limit in (200, 3):
            theirs, cut = find_glob_matches(root, pattern, include_dirs=include_dirs, max_results=limit)
            ours = sandbox.glob(VIRTUAL, pattern, include_dirs=include_dirs, max_results=limit)
            assert ours == ([_virtual(root, p) for p in theirs], cut), (pattern, limit)
    assert any(sandbox.glob(VIRTUAL, p)[0] for p in GLOBS)  # the tree is there: a positive control


def test_grep_answers_as_deer_flow_s_find_grep_matches(searched):
    sandbox, root = searched
    for pattern, options in GREPS:
        theirs, cut = find_grep_matches(root, pattern, glob_pattern=options.get("glob"),
                                        literal=options.get("literal", False),
                                        case_sensitive=options.get("case_sensitive", False),
                                        max_results=options.get("max_results", 100))
        ours, our_cut = sandbox.grep(VIRTUAL, pattern, **options)
        assert [(m.path, m.line_number, m.line) for m in ours] == [
            (_virtual(root, m.path), m.line_number, m.line) for m in theirs], (pattern, options)
        assert our_cut is cut, (pattern, options)
    assert len(sandbox.grep(VIRTUAL, "needle")[0]) > 10  # a positive control
    one_file, _ = sandbox.grep(f"{VIRTUAL}/docs/readme.md", "needle")
    assert [(m.line_number, m.line) for m in one_file] == [
        (m.line_number, m.line) for m in find_grep_matches(root / "docs" / "readme.md", "needle")[0]]


def test_missing_and_wrong_roots_raise_as_deer_flow_s_helpers_do(searched):
    sandbox, root = searched
    for call in (lambda r: find_glob_matches(r, "*"), lambda r: find_grep_matches(r, "x")):
        with pytest.raises(FileNotFoundError):
            call(root / "missing")
    with pytest.raises(FileNotFoundError):
        sandbox.glob(f"{VIRTUAL}/missing", "*")
    with pytest.raises(FileNotFoundError):
        sandbox.grep(f"{VIRTUAL}/missing", "x")
    with pytest.raises(NotADirectoryError):
        find_glob_matches(root / "a.py", "*")
    with pytest.raises(NotADirectoryError):
        sandbox.glob(f"{VIRTUAL}/a.py", "*")
    with pytest.raises(ValueError):
        find_glob_matches(root, "")
    with pytest.raises(ValueError):
        sandbox.glob(VIRTUAL, "")
