"""deer-flow's loader, agent tools, gateway routers and middleware, on our provider, for real.

Every call here is deer-flow's own code (``get_sandbox_provider``, ``deerflow.sandbox.tools``,
``SandboxMiddleware``, ``app.gateway.routers.uploads`` and ``.artifacts``), on real sandboxes
of a real pool; what is checked is what a deer-flow user sees.
"""

from __future__ import annotations

import asyncio
import time
from io import BytesIO

import pytest
from deerflow.sandbox import tools
from deerflow.sandbox.sandbox import Sandbox
from deerflow.sandbox.sandbox_provider import SandboxProvider, get_sandbox_provider

import sandbox_actors
from sandbox_actors.integrations.deerflow import RaySandboxProvider
from tests.deerflow_contract.conftest import reset_deerflow, tool_runtime


def _call(tool, runtime, *args, use_async: bool):
    """A tool as deer-flow's agent calls it: its function, or its coroutine."""
    if use_async:
        return asyncio.run(tool.coroutine(runtime, *args))
    return tool.func(runtime, *args)


def test_deer_flow_s_loader_builds_our_provider_from_its_config(deerflow):
    provider = get_sandbox_provider()
    assert isinstance(provider, SandboxProvider) and type(provider) is RaySandboxProvider
    assert get_sandbox_provider() is provider  # one per process, as deer-flow keeps it
    sandbox = provider.get(provider.acquire("chat-load", user_id="alice"))
    assert isinstance(sandbox, Sandbox)
    assert provider.pool.config.pool_name == deerflow.ours["pool_name"]  # our keys, from sandbox.sandbox_actors


@pytest.mark.parametrize("use_async", [False, True], ids=["func", "coroutine"])
def test_deer_flow_s_tools_work_on_our_sandboxes(deerflow, use_async):
    thread, user = f"chat-tools-{int(use_async)}", "alice"
    runtime = tool_runtime(thread, user)
    call = lambda tool, *args: _call(tool, runtime, *args, use_async=use_async)  # noqa: E731

    assert call(tools.bash_tool, "where", "pwd").strip() == "/mnt/user-data/workspace"
    sandbox_id = runtime.state["sandbox"]["sandbox_id"]  # acquired lazily, kept in the graph state
    assert "OK" in call(tools.write_file_tool, "write", "/mnt/user-data/workspace/src/app.py",
                        "def main():\n    return 'needle'\n")
    assert "needle" in call(tools.read_file_tool, "read", "/mnt/user-data/workspace/src/app.py")
    assert "OK" in call(tools.str_replace_tool, "edit", "/mnt/user-data/workspace/src/app.py", "needle", "thread")
    assert call(tools.read_file_tool, "read", "/mnt/user-data/workspace/src/app.py", 2, 2).strip() == \
        "return 'thread'"
    assert "/mnt/user-data/workspace/src" in call(tools.ls_tool, "list", "/mnt/user-data/workspace")
    assert "/mnt/user-data/workspace/src/app.py" in call(tools.glob_tool, "find", "**/*.py", "/mnt/user-data/workspace")
    grepped = call(tools.grep_tool, "search", "THREAD", "/mnt/user-data/workspace")
    assert "/mnt/user-data/workspace/src/app.py" in grepped and "return 'thread'" in grepped
    # The file is in deer-flow's own workspace directory of (alice, thread) on this host.
    workspace = deerflow.paths().sandbox_work_dir(thread, user_id=user)
    assert (workspace / "src" / "app.py").read_text() == "def main():\n    return 'thread'\n"
    # Skills, read-only, where deer-flow's skills.container_path says.
    assert "# Demo" in call(tools.read_file_tool, "skill", "/mnt/skills/public/demo/SKILL.md")
    assert "Read-only" in call(tools.bash_tool, "try", "touch /mnt/skills/public/demo/x 2>&1; true")
    assert get_sandbox_provider().get(sandbox_id) is not None


def test_a_command_with_request_scoped_env_separates_stderr_as_deer_flow_s_sandbox_does(deerflow):
    provider = get_sandbox_provider()
    sandbox = provider.get(provider.acquire("chat-env", user_id="alice"))
    out = sandbox.execute_command('echo "token has ${#TOKEN} chars"; echo oops >&2', env={"TOKEN": "s3cret"})
    assert out == "token has 6 chars\n\nStd Error:\noops\n"
    assert sandbox.execute_command("echo only-err >&2", env={"A": "1"}) == "only-err\n"
    assert sandbox.execute_command("true", env={"A": "1"}) == "(no output)"
    assert sandbox.execute_command("echo both; echo err >&2") == "both\nerr\n"  # the shell: one stream
    with pytest.raises(ValueError):
        sandbox.execute_command("true", env={"BAD NAME": "x"})


def test_uploads_reach_the_sandbox_and_outputs_are_served_as_artifacts(deerflow):
    from _router_auth_helpers import make_authed_test_app
    from app.gateway.auth.models import User
    from app.gateway.routers import artifacts, uploads
    from deerflow.runtime.user_context import reset_current_user, set_current_user
    from fastapi.testclient import TestClient
    from starlette.middleware.base import BaseHTTPMiddleware

    user = User(email="alice@example.com", password_hash="x", system_role="user")

    class CurrentUser(BaseHTTPMiddleware):  # what deer-flow's AuthMiddleware does for a signed-in user
        async def dispatch(self, request, call_next):
            token = set_current_user(user)
            try:
                return await call_next(request)
            finally:
                reset_current_user(token)

    app = make_authed_test_app(user_factory=lambda: user)
    app.add_middleware(CurrentUser)
    app.include_router(uploads.router)
    app.include_router(artifacts.router)
    thread = "chat-files"
    with TestClient(app) as client:
        sent = client.post(f"/api/threads/{thread}/uploads", files=[("files", ("data.csv", BytesIO(b"a,b\n1,2\n")))])
        assert sent.status_code == 200, sent.text
        # The agent's turn: deer-flow's tools, as that user, in that conversation.
        runtime = tool_runtime(thread, str(user.id))
        assert tools.bash_tool.func(runtime, "read the upload", "cat /mnt/user-data/uploads/data.csv") == "a,b\n1,2\n"
        tools.bash_tool.func(runtime, "make a report", "wc -l < /mnt/user-data/uploads/data.csv > "
                             "/mnt/user-data/outputs/report.txt")
        served = client.get(f"/api/threads/{thread}/artifacts/mnt/user-data/outputs/report.txt")
        assert served.status_code == 200 and served.text == "2\n"
        assert client.get(f"/api/threads/{thread}/artifacts/mnt/user-data/outputs/missing.txt").status_code == 404


def test_middleware_acquires_and_releases_across_turns(deerflow):
    from deerflow.sandbox.middleware import SandboxMiddleware

    middleware = SandboxMiddleware(lazy_init=False)
    runtime = tool_runtime("chat-turns", "alice")
    state = {}
    update = middleware.before_agent(state, runtime)  # a turn begins: eager acquire
    state.update(update)
    sandbox_id = state["sandbox"]["sandbox_id"]
    runtime = tool_runtime("chat-turns", "alice", state)
    tools.bash_tool.func(runtime, "remember", "echo kept > /tmp/kept.txt; export TURN=one")
    middleware.after_agent(state, runtime)  # the turn ends: released (warm)
    assert get_sandbox_provider().get(sandbox_id) is None
    rows = {row["sandbox_id"]: row["state"] for row in get_sandbox_provider().pool.list()}
    assert rows[sandbox_id] == "warm"
    # The next turn finds the id in its state, asks the provider, and acquires again: same sandbox.
    assert tools.bash_tool.func(runtime, "recall", "cat /tmp/kept.txt; echo $TURN") == "kept\none\n"
    assert runtime.state["sandbox"]["sandbox_id"] == sandbox_id


def test_get_is_a_lookup_in_memory_and_acquire_async_keeps_the_loop_free(deerflow):
    provider = get_sandbox_provider()
    sandbox_id = provider.acquire("chat-loop", user_id="alice")

    def no_ray(*args, **kwargs):
        raise AssertionError("get() called Ray")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(sandbox_actors.client.raycalls, "value", no_ray)
        patched.setattr(sandbox_actors.client.raycalls, "call", no_ray)
        assert provider.get(sandbox_id) is not None and provider.get("0" * 24) is None

    async def acquire_while_ticking():
        ticks, longest, last = 0, 0.0, time.monotonic()
        acquiring = asyncio.ensure_future(provider.acquire_async("chat-loop-2", user_id="alice"))
        while not acquiring.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            ticks, longest, last = ticks + 1, max(longest, now - last), now
        return await acquiring, ticks, longest

    started = time.monotonic()
    acquired, ticks, longest = asyncio.run(acquire_while_ticking())
    took = time.monotonic() - started
    assert provider.get(acquired) is not None
    # A new sandbox takes a few hundred ms; the loop ran all along (a blocking call stops it).
    assert ticks >= took / 0.05 and longest < took / 2, (ticks, longest, took)


def test_deer_flow_s_own_keys_are_never_taken_as_ours(deerflow):
    for key, value in (("image", "enterprise-public/all-in-one-sandbox:latest"), ("port", 8080),
                       ("environment", {"A": "1"}), ("idle_timeout", 5)):
        deerflow.write(**{key: value})
        reset_deerflow()
        with pytest.raises(sandbox_actors.ConfigError, match=rf"(?s)sandbox\.{key}:.*sandbox_actors:\n\s+{key}: "):
            get_sandbox_provider()
    deerflow.write(sandbox_actors="pool_name=x")
    reset_deerflow()
    with pytest.raises(sandbox_actors.ConfigError, match="must be a mapping"):
        get_sandbox_provider()
    deerflow.write(bash_output_max_chars=1000, allow_host_bash=False)  # deer-flow's own tool settings: fine
    reset_deerflow()
    assert isinstance(get_sandbox_provider(), RaySandboxProvider)
