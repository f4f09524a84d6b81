"""Which layers serve each operation of :mod:`sandbox_actors.api`, checked against its declaration.

``sandbox-actors operations`` prints the table; ``tests/test_operations.py`` fails when a layer
lacks an operation or differs from it in a parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from . import api

LAYERS = ("box", "box.aio", "actor", "runtime", "http client", "server", "engine")
NOT_HERE = "n/a"  # a layer an operation does not pass through (the engine's, or the sandbox API's)


def _params(function: Callable[..., Any], skip: int) -> list[tuple[str, Any]]:
    """(name, default) of a function's parameters, after the first ``skip``."""
    return [(p.name, p.default) for p in list(inspect.signature(function).parameters.values())[skip:]]


def _declared(op: api.Operation[..., Any]) -> list[tuple[str, Any]]:
    return _params(op.stub, 0)


def _face(owner: type, op: api.Operation[..., Any], kinds: tuple[type, type]) -> str:
    face = inspect.getattr_static(owner, op.name, None)
    wanted = kinds[1] if op.stream else kinds[0]
    if not isinstance(face, wanted) or getattr(face, "op", None) is not op:
        return f"missing: {owner.__name__}.{op.name} is not {wanted.__name__}(api.{op.name})"
    return "ok"


def _actor(op: api.Operation[..., Any]) -> str:
    from .sandbox import SandboxActor

    method = inspect.getattr_static(SandboxActor, op.name, None)
    if method is None:
        return f"missing: SandboxActor.{op.name}"
    if op.stream != inspect.isasyncgenfunction(method):
        return f"SandboxActor.{op.name} {'does not stream' if op.stream else 'streams'}"
    return "ok"


def _runtime(op: api.Operation[..., Any]) -> str:
    from .runtime import SandboxRuntime

    method = getattr(SandboxRuntime, op.name, None)
    if method is None:
        return f"missing: SandboxRuntime.{op.name}"
    if _params(method, 1) != _declared(op):
        return f"SandboxRuntime.{op.name}{inspect.signature(method)} differs from its declaration"
    return "ok"


def _engine(op: api.Operation[..., Any]) -> str:
    from backends.base import Backend

    if op.route != api.ENGINE:
        return NOT_HERE
    return "ok" if callable(getattr(Backend, op.name, None)) else f"missing: Backend.{op.name}"


def _http(op: api.Operation[..., Any]) -> str:
    from backends.sandbox_api import SandboxAPI

    if op.route in (api.ENGINE, api.RUNTIME):
        return NOT_HERE

    method = getattr(SandboxAPI, op.name, None)
    if method is None:
        return f"missing: SandboxAPI.{op.name}"
    have = {name for name, _ in _params(method, 1)}
    lacking = [name for name, _ in _declared(op) if name not in have]
    return f"SandboxAPI.{op.name} lacks {', '.join(lacking)}" if lacking else "ok"


def _server(op: api.Operation[..., Any]) -> str:
    from .image import server

    if op.route in (api.ENGINE, api.RUNTIME):
        return NOT_HERE
    verb, path = op.route.split(" ", 1)
    handler = server.ROUTES.get(path, {}).get(verb)
    # JSON routes are App methods; the streamed file routes are the request handler's own.
    if handler is None or not (callable(getattr(server.App, handler, None))
                               or callable(getattr(server.Handler, f"_{handler}", None))):
        return f"missing: the image's server has no {op.route}"
    return "ok"


def served(op: api.Operation[..., Any]) -> dict[str, str]:
    """For each layer, 'ok' or what is wrong with it for ``op``."""
    from .handle import AsyncSandboxHandle, SandboxHandle

    return {
        "box": _face(SandboxHandle, op, (api.SyncCall, api.SyncStream)),
        "box.aio": _face(AsyncSandboxHandle, op, (api.AsyncCall, api.AsyncStream)),
        "actor": _actor(op),
        "runtime": _runtime(op),
        "http client": _http(op),
        "server": _server(op),
        "engine": _engine(op),
    }


def table() -> tuple[str, bool]:
    """The operations, their declarations and the layers serving each; and whether all serve all."""
    rows, whole = [], True
    for op in api.OPERATIONS:
        layers = served(op)
        whole = whole and all(v in ("ok", NOT_HERE) for v in layers.values())
        params = ", ".join(name if default is inspect.Parameter.empty else f"{name}={default!r}"
                           for name, default in _declared(op))
        kind = ("stream" if op.stream else "call") + (", retry-safe" if op.retry_safe else "")
        marks = " ".join(f"{layer}:{'✓' if state == 'ok' else '✗'}" for layer, state in layers.items()
                         if state != NOT_HERE)
        rows.append(f"{op.name}({params})  [{kind}]  {op.route}\n    {marks}")
        rows += [f"    ✗ {state}" for state in layers.values() if state not in ("ok", NOT_HERE)]
    return "\n".join(rows), whole
