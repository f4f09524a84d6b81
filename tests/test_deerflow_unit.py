"""The deer-flow adapter's interface, checked against deer-flow's as it is documented (names,
parameters, defaults, keyword-only markers), without deer-flow installed; and its pure helpers."""

from __future__ import annotations

import inspect
from pathlib import Path, PurePosixPath

import pytest

from sandbox_actors.integrations import deerflow
from sandbox_actors.integrations import sandbox_search
from sandbox_actors.integrations.deerflow import RaySandbox, RaySandboxProvider

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
EMPTY = inspect.Parameter.empty
# deer-flow's SandboxProvider and Sandbox: (name, kind, default) after self, and what they return.
PROVIDER = {
    "acquire": ([("thread_id", P, None), ("user_id", K, None)], str),
    "acquire_async": ([("thread_id", P, None), ("user_id", K, None)], str),
    "get": ([("sandbox_id", P, EMPTY)], "RaySandbox | None"),
    "release": ([("sandbox_id", P, EMPTY)], None),
    "reset": ([], None),
    "shutdown": ([], None),
}
SANDBOX = {
    "execute_command": ([("command", P, EMPTY), ("env", P, None), ("timeout", P, None)], str),
    "read_file": ([("path", P, EMPTY), ("start_line", P, None), ("end_line", P, None)], str),
    "download_file": ([("path", P, EMPTY)], bytes),
    "list_dir": ([("path", P, EMPTY), ("max_depth", P, 2)], "list[str]"),
    "write_file": ([("path", P, EMPTY), ("content", P, EMPTY), ("append", P, False)], None),
    "glob": ([("path", P, EMPTY), ("pattern", P, EMPTY), ("include_dirs", K, False), ("max_results", K, 200)],
             "tuple[list[str], bool]"),
    "grep": ([("path", P, EMPTY), ("pattern", P, EMPTY), ("glob", K, None), ("literal", K, False),
              ("case_sensitive", K, False), ("max_results", K, 100)], "tuple[list[GrepMatch], bool]"),
    "update_file": ([("path", P, EMPTY), ("content", P, EMPTY)], None),
}


def _check(cls: type, interface: dict) -> None:
    for name, (params, returns) in interface.items():
        method = getattr(cls, name)
        signature = inspect.signature(method)
        got = [(p.name, p.kind, p.default) for p in list(signature.parameters.values())[1:]]
        assert got == params, f"{cls.__name__}.{name}{signature}"
        annotation = signature.return_annotation
        expected = "None" if returns is None else returns if isinstance(returns, str) else returns.__name__
        assert annotation == expected, f"{cls.__name__}.{name} returns {annotation}, not {expected}"


def test_the_provider_has_deerflows_interface():
    _check(RaySandboxProvider, PROVIDER)
    assert inspect.iscoroutinefunction(RaySandboxProvider.acquire_async)
    assert RaySandboxProvider.uses_thread_data_mounts is True  # the pool mounts the thread's dirs
    assert RaySandboxProvider.needs_upload_permission_adjustment is True  # commands run unprivileged
    assert inspect.signature(RaySandboxProvider).bind()  # deer-flow builds it with no arguments


def test_the_sandbox_has_deerflows_interface():
    _check(RaySandbox, SANDBOX)
    assert isinstance(RaySandbox.id, property)
    match = deerflow.GrepMatch(path="/a", line_number=3, line="x")
    assert (match.path, match.line_number, match.line) == ("/a", 3, "x")


def test_sandboxes_are_keyed_by_user_and_thread():
    key = RaySandboxProvider.thread_key
    assert key("t1", "alice") != key("t1", "bob") != key("t1", None)
    assert key("t1", "alice") == key("t1", "alice")
    assert key(None, "alice") is None  # anonymous stays anonymous


# Names PurePosixPath.match has to get right: hidden, dotted, bracketed, spaced, unicode.
NAMES = ["a.py", ".hidden.py", "b.txt", "[x].py", "a b.py", "é.md", "src", "docs", "x.tar.gz", "**", "?"]
PATTERNS = ["*.py", "**/*.py", "src/*.py", "src/**", "?.py", "[[]x].py", "*", "**", "*/*", "*.tar.*", "docs/*.md",
            "a b.py", "**/src/*.py", "/abs/*.py", "src//a.py", "./a.py", "[!a]*.py", "*.PY", ".*"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_relative_paths_as_pure_posix_path_match_does(pattern):
    """deer-flow matches with PurePosixPath(rel).match(pattern) (and again without a leading
    '**/'); the sandbox's script must agree on every path, whatever its Python."""
    paths = [*NAMES, *(f"{d}/{n}" for d in ("src", "docs", "src/deep") for n in NAMES)]
    for path in paths:
        expected = PurePosixPath(path).match(pattern) or (
            pattern.startswith("**/") and PurePosixPath(path).match(pattern[3:]))
        assert sandbox_search.path_matches(pattern, path) is expected, (pattern, path)
    with pytest.raises(ValueError, match="empty pattern"):
        sandbox_search.path_matches("", "a.py")


def test_search_follows_deerflows_rules_on_a_tree(tmp_path):
    root = tmp_path / "ws"
    for rel, data in [("a.py", "needle\n"), ("src/b.py", "x\nNeedle here\n"), (".hidden/c.py", "needle\n"),
                      ("node_modules/d.py", "needle\n"), ("build.log", "needle\n"), ("bin.dat", "needle\0\n"),
                      ("long.py", "needle " + "x" * 2500 + "\n" + "needle " + "y" * 300 + "\n"),
                      ("crlf.py", "one\r\nneedle\r\n")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data.encode())
    (root / "link.py").symlink_to(root / "a.py")
    ignore = [".git", "node_modules", "*.log"]
    found, cut = sandbox_search.find_glob(str(root), "**/*.py", ignore=ignore)
    relative = sorted(str(Path(p).relative_to(root)) for p in found)
    assert relative == [".hidden/c.py", "a.py", "crlf.py", "link.py", "long.py", "src/b.py"] and cut is False
    assert sandbox_search.find_glob(str(root), "*.py", max_results=2, ignore=ignore)[1] is True
    matches, cut = sandbox_search.find_grep(str(root), "needle", ignore=ignore)
    by_file = {str(Path(p).relative_to(root)): (n, line) for p, n, line in matches}
    assert set(by_file) == {".hidden/c.py", "a.py", "src/b.py", "long.py", "crlf.py"}  # no link, log, binary
    assert by_file["src/b.py"] == (2, "Needle here")  # case-insensitive by default
    assert by_file["long.py"] == (2, "needle " + "y" * 190 + "...")  # the 2,500-char line is skipped
    assert by_file["crlf.py"] == (2, "needle")
    assert sandbox_search.find_grep(str(root / "a.py"), "needle", glob="*.py")[0][0][1] == 1  # a file root
    with pytest.raises(FileNotFoundError):
        sandbox_search.find_glob(str(root / "missing"), "*")
    with pytest.raises(NotADirectoryError):
        sandbox_search.find_glob(str(root / "a.py"), "*")
    assert sandbox_search.main({"op": "grep", "path": str(root / "nope"), "pattern": "x"})["error"] == \
        "FileNotFoundError"


def test_env_names_are_checked_before_anything_runs():
    class NoBox:
        def bash(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("must not be reached")

    with pytest.raises(ValueError, match="environment variable name"):
        RaySandbox("x", NoBox()).execute_command("true", env={"BAD-NAME": "1"})
