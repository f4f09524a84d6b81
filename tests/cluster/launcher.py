"""``cluster.yaml`` plus the test's overlay, and the ``ray`` CLI run against the merged file.

The overlay holds only what must differ on this machine (README, "Launch a cluster", names
each line and why). It is merged into the real ``cluster.yaml`` at run time, so a change to
that file is what the test runs.

The ``ray`` commands run from the repository root (``file_mounts`` names the repository's parts by
paths relative to it) with a HOME of the test's own: ``cluster.yaml`` copies ``~/.ray/auth_token``, and the
test generates that token there rather than touch the token of the user who runs it.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
WHEELHOUSE = "/opt/sandbox-actors-wheelhouse"  # on every node
RESULT_MARK = "CLUSTER-JOB-RESULT "


class LaunchError(RuntimeError):
    """A ``ray`` command failed; the message carries the tail of its output."""


# ── the overlay ─────────────────────────────────────────────────────────────


def overlay(
    *, cluster_name: str, head_ip: str, worker_ips: list[str], ssh_key: Path, wheelhouse: Path, pip_conf: Path
) -> dict[str, Any]:
    """What differs from ``cluster.yaml`` here, and nothing else (each line is in the README)."""
    return {
        # The launcher keeps its state in /tmp/ray/cluster-<name>.state on this machine: a name of
        # the run's own leaves the state of a real `sandbox-actors` cluster launched from here alone.
        "cluster_name": cluster_name,
        # The node containers' addresses on the test's network.
        "provider": {"head_ip": head_ip, "worker_ips": worker_ips},
        # The nodes' only user is root (Ray runs as root, so per-pool iptables rules can be
        # installed); the key is the one the test made and mounted into every node.
        "auth": {"ssh_user": "root", "ssh_private_key": str(ssh_key)},
        "file_mounts": {
            # PyPI may be unreachable from the nodes: the project's dependencies travel as wheels,
            # the very versions this machine's .venv runs (the host's `ray` CLI must match the
            # cluster's Ray), and pip on each node is told to use them and no index.
            WHEELHOUSE: str(wheelhouse),
            "/etc/pip.conf": str(pip_conf),
        },
    }


def pip_conf_text() -> str:
    return f"[global]\nno-index = true\nfind-links = {WHEELHOUSE}\ndisable-pip-version-check = true\n"


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def overlay_paths(extra: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The leaf keys an overlay sets, as paths (``("provider", "head_ip")``)."""
    paths: list[tuple[str, ...]] = []
    for key, value in extra.items():
        if isinstance(value, Mapping):
            paths += overlay_paths(value, prefix + (key,))
        else:
            paths.append(prefix + (key,))
    return paths


# ── the wheelhouse ──────────────────────────────────────────────────────────


def project_dependencies(project: str = "sandbox-actors") -> list[str]:
    """The installed project's run-time requirements (no extras) and its build backend's."""
    runtime = [raw for raw in metadata.requires(project) or [] if Requirement(raw).marker is None]
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, which this project supports, has no tomllib
        match = re.search(r"^\[build-system\][^\[]*?^requires\s*=\s*\[([^\]]*)\]", text, re.M | re.S)
        if match is None:
            raise LaunchError("pyproject.toml has no [build-system] requires") from None
        return runtime + re.findall(r'"([^"]+)"', match.group(1))
    return runtime + list(tomllib.loads(text)["build-system"]["requires"])


def runtime_pins(project: str = "sandbox-actors") -> str:
    """``name==version`` lines for every distribution the installed project needs at run time,
    as this .venv has them (its test extra and whatever else the venv holds left out)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(project), frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = metadata.distribution(name)
        if name != canonicalize_name(project):
            found[name] = dist.version
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras | {""})
            )
            if wanted:
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


def wheelhouse(cache_root: Path, progress: Any = print) -> Path:
    """Wheels of the project's dependencies (and its build backend) at the versions this
    .venv has, built once per set of inputs and kept under ``cache_root``."""
    pins = runtime_pins()
    requirements = project_dependencies()
    digest = hashlib.sha256(
        json.dumps([sys.version_info[:2], requirements, pins]).encode()
    ).hexdigest()[:12]
    target = cache_root / f"wheelhouse-{digest}"
    if (target / ".complete").exists():
        progress(f"wheelhouse {target} is up to date")
        return target
    partial = cache_root / f"wheelhouse-{digest}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "constraints.txt").write_text(pins)
    progress(f"wheelhouse: {len(requirements)} requirements at this .venv's versions -> {target}")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial),
         "--constraint", str(partial / "constraints.txt"), *requirements],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    if result.returncode != 0:
        raise LaunchError(f"pip wheel failed ({result.returncode}):\n{result.stderr[-3000:]}")
    (partial / "constraints.txt").unlink()
    for stale in cache_root.glob("wheelhouse-*"):
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    (partial / ".complete").write_text("")
    partial.rename(target)
    return target


# ── the ray CLI ─────────────────────────────────────────────────────────────


@dataclass
class RayCli:
    """The host's ``ray`` CLI against one merged cluster config."""

    config: Path
    home: Path
    logs: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            HOME=str(self.home),
            RAY_USAGE_STATS_ENABLED="0",
            # The cluster runs with token auth (cluster.yaml's start commands): so do our clients.
            RAY_AUTH_MODE="token",
            PYTHONUNBUFFERED="1",
        )
        return env

    def run(self, name: str, *args: str, timeout: float, check: bool = True) -> str:
        """``ray ARGS...``; its output goes to ``<logs>/<name>.log`` and is returned."""
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            result = subprocess.run(
                [RAY, *args], cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, timeout=timeout, check=False,
            )
        text = log.read_text(errors="replace").replace("\r", "")
        if check and result.returncode != 0:
            raise LaunchError(f"`ray {' '.join(args[:2])}` failed ({result.returncode}); see {log}:\n{text[-4000:]}")
        return text

    def generate_token(self) -> Path:
        """``ray get-auth-token --generate`` in the test's HOME, as README tells users to."""
        self.run("get-auth-token", "get-auth-token", "--generate", timeout=60)
        token = self.home / ".ray" / "auth_token"
        if not token.exists():
            raise LaunchError(f"`ray get-auth-token --generate` made no {token}")
        return token

    def up(self, timeout: float = 1200) -> str:
        return self.run("ray-up", "up", "--yes", "--no-config-cache", "--log-style", "record",
                        "--log-color", "false", str(self.config), timeout=timeout)

    def down(self, timeout: float = 300) -> str:
        return self.run("ray-down", "down", "--yes", "--log-style", "record", "--log-color", "false",
                        str(self.config), timeout=timeout)

    def exec(self, name: str, command: str, timeout: float = 180) -> str:
        return self.run(name, "exec", "--no-config-cache", "--log-style", "record", "--log-color", "false",
                        str(self.config), command, timeout=timeout)

    def forward_dashboard(self, attempt: int = 1, timeout: float = 60) -> DashboardForward:
        """``ray dashboard``: the head's dashboard (bound to its loopback) on a local port."""
        port = _free_port()
        log_path = self.logs / f"ray-dashboard-{attempt}.log"
        log = log_path.open("w")
        process = subprocess.Popen(
            [RAY, "dashboard", "--no-config-cache", "--port", str(port), str(self.config)],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its ssh is in its group: stop() ends exactly these
        )
        forward = DashboardForward(process, port, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while not forward.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                forward.stop()
                raise LaunchError(f"`ray dashboard` did not forward port {port}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        return forward

    def submit(
        self, submission_id: str, address: str, entrypoint: list[str], *,
        resources: Mapping[str, float] | None = None,
    ) -> None:
        """``ray job submit --no-wait``: the job is queued; follow it with :class:`JobWatcher`."""
        args = ["job", "submit", "--no-wait", "--address", address, "--submission-id", submission_id,
                "--log-style", "record", "--log-color", "false"]
        if resources:
            args += ["--entrypoint-resources", json.dumps(dict(resources))]
        self.run(f"job-{submission_id}-submit", *args, "--", *entrypoint, timeout=120)

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()


class JobGone(LaunchError):
    """The dashboard does not know the job (its submission never arrived)."""


def job_state(address: str, token: str, submission_id: str) -> tuple[str, str]:
    """The job's status and its driver's logs so far, from the dashboard's REST API (what
    `ray job status` and `ray job logs` read), with the cluster's token.

    Raises:
        OSError / httpx.HTTPError: the dashboard (or the forward to it) did not answer.
        JobGone: no such job.
    """
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=address, headers=headers, timeout=15, trust_env=False) as client:
        info = client.get(f"/api/jobs/{submission_id}")
        if info.status_code == 404:
            raise JobGone(f"the dashboard knows no job {submission_id}")
        info.raise_for_status()
        logs = client.get(f"/api/jobs/{submission_id}/logs")
        logs.raise_for_status()
    return info.json()["status"], logs.json().get("logs", "")


def job_result(logs: str) -> dict[str, Any] | None:
    """The result line a job of tests/cluster/job.py printed, if it did."""
    found = [line[len(RESULT_MARK):] for line in logs.splitlines() if line.startswith(RESULT_MARK)]
    return json.loads(found[-1]) if found else None


@dataclass
class DashboardForward:
    process: subprocess.Popen
    port: int
    address: str

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"GET /api/version HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return sock.recv(12).startswith(b"HTTP/")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps the control sockets of ``cluster_name`` (its own recipe, in
    ray.autoscaler._private.command_runner.SSHCommandRunner)."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:HASH_MAX_LENGTH]
    cluster = hashlib.sha256(cluster_name.encode()).hexdigest()[:HASH_MAX_LENGTH]
    return Path(f"/tmp/ray_ssh_{user}") / cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def json_block(text: str) -> Any:
    """The JSON document in a command's output (``ray exec`` surrounds it with its own lines)."""
    start = re.search(r"^[\[{]", text, re.M)
    if start is None:
        raise LaunchError(f"no JSON in:\n{text[-2000:]}")
    decoder = json.JSONDecoder()
    value, _ = decoder.raw_decode(text[start.start():])
    return value
