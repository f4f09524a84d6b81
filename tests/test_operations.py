"""Each sandbox operation is declared once (sandbox_actors/api.py); every layer serves each, as
declared. A layer that lacks one, or differs in a parameter, fails here."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from backends.sandbox_api import SandboxAPI
from sandbox_actors import api, layers
from sandbox_actors.handle import AsyncSandboxHandle, SandboxHandle
from sandbox_actors.runtime import SandboxRuntime


@pytest.mark.parametrize("op", api.OPERATIONS, ids=lambda op: op.name)
def test_every_layer_serves_the_operation_as_declared(op):
    # The sandbox API's layers, or the engine's: an operation passes through one of the two.
    apart = {"http client", "server"} if op.route in (api.ENGINE, api.RUNTIME) else set()
    apart |= set() if op.route == api.ENGINE else {"engine"}
    assert layers.served(op) == {layer: layers.NOT_HERE if layer in apart else "ok" for layer in layers.LAYERS}


def test_a_layer_without_an_operation_or_with_another_parameter_fails_the_check(monkeypatch):
    monkeypatch.delattr(SandboxRuntime, "read_file")
    assert layers.served(api.read_file)["runtime"] == "missing: SandboxRuntime.read_file"

    async def renamed(self, path, first_line=None, end_line=None):  # noqa: ANN001, ANN202
        raise NotImplementedError

    monkeypatch.setattr(SandboxRuntime, "read_file", renamed, raising=False)
    assert "differs from its declaration" in layers.served(api.read_file)["runtime"]
    monkeypatch.delattr(SandboxAPI, "list_files")
    assert layers.served(api.list_files)["http client"] == "missing: SandboxAPI.list_files"
    monkeypatch.delattr(AsyncSandboxHandle, "bash")
    assert layers.served(api.bash)["box.aio"].startswith("missing")


def test_box_and_box_aio_offer_the_same_operations():
    def public(cls: type) -> set[str]:
        return {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}

    assert public(SandboxHandle) == public(AsyncSandboxHandle)
    for name in ("upload", "download", "start", "hibernate", "snapshot", "release", "destroy"):
        assert inspect.iscoroutinefunction(getattr(AsyncSandboxHandle, name)), name


def test_a_call_that_does_not_fit_the_declaration_fails_before_it_leaves():
    with pytest.raises(TypeError):
        api.exec.wire(("ls",), {"no_such_option": 1})
    assert api.bash.wire(("ls",), {"env": {"A": "1"}}) == ("ls", {"A": "1"}, None, None)


def test_the_operations_command_prints_each_operation_and_its_layers():
    shown = subprocess.run([sys.executable, "-m", "sandbox_actors.cli", "operations"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for op in api.OPERATIONS:
        assert f"{op.name}(" in shown.stdout
    assert "every layer serves every operation" in shown.stdout
