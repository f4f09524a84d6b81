"""The deer-flow adapter's interface, checked against deer-flow's as it is documented (names,
parameters, defaults, keyword-only markers), without deer-flow installed; and its pure helpers."""

from __future__ import annotations

import inspect

import pytest

from sandbox_actors.integrations import deerflow
from sandbox_actors.integrations.deerflow import RaySandbox, RaySandboxProvider, glob_regex

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
    assert RaySandboxProvider.needs_upload_permission_adjustment is False
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


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("*.py", "a.py", True), ("*.py", "src/a.py", False), ("**/*.py", "src/a.py", True),
    ("**/*.py", "a.py", True), ("src/**", "src/x/y.txt", True), ("?.md", "ab.md", False),
    ("docs/*.md", "docs/readme.md", True), ("a+b.txt", "a+b.txt", True),
])
def test_glob_patterns_match_relative_paths(pattern, path, matches):
    assert bool(glob_regex(pattern).match(path)) is matches


def test_env_names_are_checked_before_anything_runs():
    class NoBox:
        def bash(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("must not be reached")

    with pytest.raises(ValueError, match="environment variable name"):
        RaySandbox("x", NoBox()).execute_command("true", env={"BAD-NAME": "1"})
