"""DockerBackend + SandboxAPI against a real engine and real containers of our image (no Ray)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import stat
import time
from pathlib import Path

import httpx
import pytest

from backends import DockerBackend, Limits, Mount, SandboxAPI, SandboxSpec
from backends.errors import (
    BackendError,
    BackendUnavailable,
    CommandTimeout,
    ImageNotFound,
    InvalidRequest,
    SandboxAuthError,
    SandboxDied,
    SandboxFileNotFound,
)
from backends.firewall import NetworkPolicy
from backends.images import ImageStore
from backends.network import pool_tag
from tests.conftest import containers_of, run


def spec_for(pool: str, image: str, **overrides) -> SandboxSpec:
    values = dict(
        sandbox_id=secrets.token_hex(12),
        pool=pool,
        image=image,
        thread_id="thread/with\nodd chars",
        token=secrets.token_urlsafe(16),
        environment={"FOO": "bar"},
        limits=Limits(memory="256m", cpus=0.5, pids=128),
    )
    values.update(overrides)
    return SandboxSpec(**values)


async def ready_api(backend: DockerBackend, record) -> SandboxAPI:
    api = SandboxAPI(record.url, record.token)
    await api.wait_ready(
        20, lambda: backend.is_running(record.sandbox_id), lambda: backend.logs_tail(record.sandbox_id)
    )
    return api


def test_create_ready_exec_files_destroy(pool_name, image):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image))
        api = await ready_api(backend, record)
        try:
            echo = await api.exec("echo hello")
            assert (echo.output.strip(), echo.exit_code) == ("hello", 0)
            failed = await api.exec("ls /definitely-missing")
            assert failed.exit_code != 0 and "definitely-missing" in failed.output
            split = await api.bash("echo out; echo err >&2; exit 3")
            assert (split.stdout, split.stderr, split.exit_code) == ("out\n", "err\n", 3)
            env = await api.bash('echo "$FOO $EXTRA"', env={"EXTRA": "given"})
            assert env.stdout == "bar given\n"

            await api.write_file("/home/sandbox/work/notes.txt", "line one\nline two\n")
            assert await api.read_file("/home/sandbox/work/notes.txt") == "line one\nline two\n"
            blob = bytes(range(256)) * 64
            assert await api.write_file("/home/sandbox/work/blob.bin", blob) == len(blob)
            assert await api.read_bytes("/home/sandbox/work/blob.bin") == blob
            names = {f.name: f for f in await api.list_files("/home/sandbox/work")}
            assert set(names) == {"notes.txt", "blob.bin"}
            assert names["blob.bin"].size == len(blob) and not names["blob.bin"].is_directory
            with pytest.raises(SandboxFileNotFound):
                await api.read_file("/home/sandbox/work/missing.txt")
            with pytest.raises(InvalidRequest):
                await api.read_file("/home/sandbox/work")  # a directory
        finally:
            await api.aclose()
        assert await backend.destroy(record.sandbox_id) is True
        assert await backend.is_running(record.sandbox_id) is False
        assert await backend.discover(record.sandbox_id) is None
        await backend.teardown(pool_name)
        await backend.close()

    run(body())


def test_the_image_s_api_server_runs_compiled_without_openssl(pool_name, image, docker_client):
    """What every sandbox's start waits for starts lean: the build-time compiled server, with
    neither OpenSSL library loaded (they made its start ~10 ms slower and held ~9 MB), and it
    still checks the token (its SHA-256 is Python's own now)."""
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image, mounts=()))
        api = await ready_api(backend, record)
        try:
            top = docker_client.containers.get(record.container_id).top(ps_args="-o pid,args")
            servers = [int(row[0]) for row in top["Processes"] if row[1].startswith("/usr/bin/python3")]
            assert len(servers) == 1, top["Processes"]
            assert Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0")[-2] == b"/opt/sandbox/server.pyc"
            libraries = {line.split()[-1] for line in Path(f"/proc/{servers[0]}/maps").read_text().splitlines()
                         if ".so" in line}
            assert libraries and not any("libssl" in lib or "libcrypto" in lib for lib in libraries), libraries
            assert (await api.exec("echo hashed")).output.strip() == "hashed"
            wrong = SandboxAPI(record.url, "not-the-token")
            try:
                with pytest.raises(SandboxAuthError):
                    await wrong.exec("true")
            finally:
                await wrong.aclose()
        finally:
            await api.aclose()
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)
            await backend.close()

    run(body())


def test_a_rebuilt_image_leaves_no_dangling_image_behind(image, docker_client):
    """Rebuilding an image (its inputs changed, e.g. after an upgrade) removes the one the tag
    named before, which nothing uses any more, and keeps one a container still uses."""
    tag = "sandbox-actors-test-rebuild:latest"
    store = ImageStore()
    built, user = [], None
    try:
        for generation in (1, 2, 3):
            dockerfile = f'FROM {image}\nLABEL sandbox-actors.test-rebuild="{generation}"\n'
            store.build(tag, {"Dockerfile": dockerfile.encode()}, {"sandbox-actors.test": "1"})
            built.append(store.image_id(tag))
            if generation == 2:  # a container keeps the second one in use
                user = docker_client.containers.create(tag, command=["true"], labels={"sandbox-actors.test": "1"})
        assert len(set(built)) == 3
        assert store.image_id(built[0]) is None  # unused: gone with its rebuild
        assert store.image_id(built[1]) == built[1]  # in use by a container: kept
        assert docker_client.images.list(filters={"dangling": True, "label": "sandbox-actors.test-rebuild"}) == [
            docker_client.images.get(built[1])]
    finally:
        if user is not None:
            user.remove(force=True)
        for image_id in built:
            if store.image_id(image_id) is not None:
                docker_client.images.remove(image_id, force=True)
        store.close()


def test_socket_labels_and_lockdown(pool_name, image, docker_client):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        spec = spec_for(pool_name, image, mounts=())
        record = await backend.create(spec)
        socket_path = record.url.removeprefix("unix:")
        try:
            await (await ready_api(backend, record)).aclose()
            attrs = docker_client.containers.get(record.container_id).attrs
            assert not attrs["HostConfig"]["PortBindings"]  # no port at all: the API is on a unix socket
            assert record.url.startswith("unix:") and Path(socket_path).is_socket()
            assert stat.S_IMODE(Path(socket_path).parent.stat().st_mode) == 0o700  # private to this node's actors
            assert list(attrs["NetworkSettings"]["Networks"]) == [f"sbx-net-{pool_tag(pool_name)}"]
            env = attrs["Config"]["Env"]
            assert not any(spec.token in item for item in env)  # the engine holds only the token's hash
            assert f"SANDBOX_TOKEN_SHA256={hashlib.sha256(spec.token.encode()).hexdigest()}" in env
            labels = attrs["Config"]["Labels"]
            assert labels["sandbox-actors.project"] == "sandbox-actors"
            assert labels["sandbox-actors.pool"] == pool_name
            assert labels["sandbox-actors.sandbox-id"] == spec.sandbox_id
            assert labels["sandbox-actors.engine-id"] == docker_client.info()["ID"]
            assert "sandbox-actors.token" not in record.labels and record.token == spec.token
            assert record.thread_id == spec.thread_id  # odd characters survive the label round trip
            host = attrs["HostConfig"]
            assert host["Privileged"] is False
            assert "no-new-privileges" in host["SecurityOpt"]
            assert host["CapDrop"] == ["ALL"]
            assert host["Memory"] == 256 * 2**20 and host["NanoCpus"] == 5 * 10**8 and host["PidsLimit"] == 128
            assert record.container_name == f"sat-{pool_name}-{spec.sandbox_id}"
        finally:
            await backend.destroy(record.sandbox_id)
            assert not Path(socket_path).parent.exists()  # the socket directory goes with its container
            await backend.teardown(pool_name)
            await backend.close()

    run(body())


def test_an_image_without_a_socket_is_served_on_a_loopback_port(pool_name, tcp_image, docker_client):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, tcp_image, mounts=()))
        api = await ready_api(backend, record)
        try:
            attrs = docker_client.containers.get(record.container_id).attrs
            bindings = attrs["NetworkSettings"]["Ports"]["8080/tcp"]
            assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings)
            assert attrs["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == ""  # engine picked it
            assert record.url.startswith("http://127.0.0.1:")
            assert (await api.exec("id -un")).output.strip() == "sandbox"
        finally:
            await api.aclose()
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)
            await backend.close()

    run(body())


def test_name_conflict_discovers_and_destroy_is_idempotent(pool_name, image, docker_client):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        spec = spec_for(pool_name, image)
        first = await backend.create(spec)
        second = await backend.create(spec)
        assert second.container_id == first.container_id
        assert len(containers_of(docker_client, pool_name)) == 1
        assert [r.sandbox_id for r in await backend.list(pool_name)] == [spec.sandbox_id]
        assert await backend.destroy(spec.sandbox_id) is True
        assert await backend.destroy(spec.sandbox_id) is False
        await backend.teardown(pool_name)
        await backend.close()

    run(body())


def test_deaths_are_told_but_not_the_removals_of_our_own_destroys(pool_name, image, docker_client):
    """The node's reaper tells the pool of every container of its that dies (an inspect and a Ray
    call each); a sandbox the pool destroys is not one of them, and a container killed by anyone
    else is."""
    import threading

    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        mine, killed, last = (spec_for(pool_name, image) for _ in range(3))
        told: list[tuple[str, str]] = []
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                for event in backend.container_events(pool_name):
                    told.append((event.sandbox_id, event.event))
                    if event.sandbox_id == last.sandbox_id:
                        return  # (the stream and its client close with the generator)
            except BaseException as exc:  # shown by the assertion below
                failed.append(exc)

        try:
            for spec in (mine, killed, last):
                await backend.create(spec)
            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            await asyncio.sleep(0.5)  # following: events from here on
            assert await backend.destroy(mine.sandbox_id) is True
            docker_client.containers.get(backend.container_name(killed.sandbox_id)).kill()
            await asyncio.sleep(0.5)
            docker_client.containers.get(backend.container_name(last.sandbox_id)).kill()
            await asyncio.to_thread(follower.join, 20)
            assert not failed and not follower.is_alive(), failed
            assert (killed.sandbox_id, "die") in told and (last.sandbox_id, "die") in told, told
            assert not [t for t in told if t[0] == mine.sandbox_id], told
        finally:
            for spec in (mine, killed, last):
                await backend.destroy(spec.sandbox_id)
            await backend.teardown(pool_name)
            await backend.close()

    run(body())
    assert containers_of(docker_client, pool_name) == []


def test_a_signal_racing_a_kill_says_the_sandbox_died(pool_name, image, docker_client):
    """A gVisor container being killed refuses a signal while the engine still says it runs
    ("sandbox is not running"): the signal (a live snapshot's or hibernation's first step) says
    the sandbox died, never an engine error to act on (a live chaos run met one). Four callers
    keep signalling each of 16 sandboxes while it is killed (SIGWINCH: ignored, so only the kill
    ends it); before the fix 2-3 rounds in 16 met the engine's error."""
    assert "runsc" in (docker_client.info().get("Runtimes") or {}), "gVisor's runsc is not registered: scripts/bootstrap"

    async def body():
        backend = DockerBackend(f"sat-{pool_name}", policy=NetworkPolicy(egress="none"))
        outcomes: list[str] = []
        try:
            for _ in range(16):
                record = await backend.create(spec_for(pool_name, image, runtime="runsc",
                                                       limits=Limits(memory="1g", cpus=0.5, pids=512)))

                async def keep_signalling() -> str:
                    deadline = time.monotonic() + 30
                    try:
                        while time.monotonic() < deadline:
                            await backend.signal(record.sandbox_id, record.container_id, "SIGWINCH")
                    except SandboxDied:
                        return "died"
                    except BackendError as exc:
                        return f"{type(exc).__name__}: {exc}"
                    return "still signalled 30 s after its kill"

                try:
                    kill = asyncio.create_task(asyncio.to_thread(docker_client.api.kill, record.container_id))
                    outcomes += await asyncio.gather(*(keep_signalling() for _ in range(4)))
                    await kill
                finally:
                    await backend.destroy(record.sandbox_id)
        finally:
            await backend.teardown(pool_name)
            await backend.close()
        assert set(outcomes) == {"died"}, [o for o in outcomes if o != "died"]

    run(body())
    assert containers_of(docker_client, pool_name) == []


def test_dropping_the_endpoints_a_network_lists_lets_it_go(pool_name, image, docker_client):
    """What the bench's floor does when the engine keeps a network it no longer needs: every
    endpoint the network lists is dropped by name (a live container here, a stale one there)."""
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image))
        network = backend.network(pool_name)
        name = docker_client.containers.get(record.container_id).name
        listed = lambda: [e["Name"] for e in (docker_client.networks.get(network.name).attrs["Containers"] or {}).values()]
        assert listed() == [name]
        assert await asyncio.to_thread(network.drop_stale_endpoints) == [name]
        assert listed() == []
        assert (await backend.teardown(pool_name))["networks"] == 1  # the container still runs, off the network
        assert not await asyncio.to_thread(network.exists)
        assert await backend.destroy(record.sandbox_id) is True
        await backend.teardown(pool_name)  # its socket directory
        await backend.close()

    run(body())
    assert containers_of(docker_client, pool_name) == []


def test_unknown_image_is_typed_and_leaves_nothing(pool_name, docker_client):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        with pytest.raises(ImageNotFound, match="build-image"):
            await backend.create(spec_for(pool_name, "sandbox-actors-no-such-image:nope"))
        await backend.close()

    run(body())
    assert containers_of(docker_client, pool_name) == []


def test_engine_unreachable_is_typed_never_dead(pool_name, image, tmp_path):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}", base_url=f"unix://{tmp_path}/no-engine.sock", timeout=3)
        with pytest.raises(BackendUnavailable, match="dockerd"):
            await backend.create(spec_for(pool_name, image))
        with pytest.raises(BackendUnavailable):
            await backend.is_running("anything")  # never "False": unknown is not dead
        with pytest.raises(BackendUnavailable):
            await backend.destroy("anything")

    run(body())


def test_mounts_and_token_required(pool_name, image, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "given.txt").write_text("from the host")

    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        spec = spec_for(pool_name, image, mounts=(Mount(str(shared), "/mnt/shared", read_only=True),))
        record = await backend.create(spec)
        api = await ready_api(backend, record)
        try:
            assert await api.read_file("/mnt/shared/given.txt") == "from the host"
            denied = await api.bash("touch /mnt/shared/x")
            assert denied.exit_code != 0 and "Read-only" in denied.stderr
            transport = httpx.AsyncHTTPTransport(uds=record.url.removeprefix("unix:"))
            async with httpx.AsyncClient(base_url="http://sandbox", transport=transport) as anonymous:
                assert (await anonymous.get("/v1/sandbox")).status_code == 401
                wrong = await anonymous.post(
                    "/v1/shell/exec", json={"command": "id"}, headers={"Authorization": "Bearer wrong"}
                )
                assert wrong.status_code == 401
        finally:
            await api.aclose()
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)
            await backend.close()

    run(body())


def test_command_timeout_kills_and_shell_survives(pool_name, image):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image))
        api = await ready_api(backend, record)
        try:
            await api.exec("cd /tmp && export KEPT=yes")
            with pytest.raises(CommandTimeout):
                await api.exec("sleep 30", timeout=1)
            after = await api.exec("echo alive")
            assert after.output.strip() == "alive" and after.exit_code == 0
            with pytest.raises(CommandTimeout):
                await api.bash("sleep 30", timeout=1)
            ps = await api.bash("ps -eo comm")
            assert "sleep" not in ps.stdout.split()  # the timed-out commands were killed
        finally:
            await api.aclose()
            await backend.destroy(record.sandbox_id)
            await backend.teardown(pool_name)
            await backend.close()

    run(body())


def test_agent_sandbox_sdk_contract(pool_name, image):
    """A client we did not write (the agent-sandbox SDK from PyPI) drives our image."""
    from agent_sandbox import Sandbox

    async def start():
        backend = DockerBackend(f"sat-{pool_name}")
        record = await backend.create(spec_for(pool_name, image))
        api = await ready_api(backend, record)
        await api.aclose()
        return backend, record

    backend, record = run(start())
    try:
        # The SDK takes an httpx client: one on the sandbox's unix socket.
        http = httpx.Client(
            base_url="http://sandbox", transport=httpx.HTTPTransport(uds=record.url.removeprefix("unix:")),
            headers={"Authorization": f"Bearer {record.token}"},
        )
        client = Sandbox(base_url="http://sandbox", httpx_client=http)
        context = client.sandbox.get_context()
        assert context.home_dir == "/home/sandbox"
        result = client.shell.exec_command(command="echo from-sdk && uname -s")
        assert result.success and result.data.exit_code == 0
        assert "from-sdk" in result.data.output and "Linux" in result.data.output
        written = client.file.write_file(file="/home/sandbox/sdk.txt", content="written by the SDK")
        assert written.success
        read = client.file.read_file(file="/home/sandbox/sdk.txt")
        assert read.data.content == "written by the SDK"
        listed = client.file.list_path(path="/home/sandbox")
        assert "sdk.txt" in {f.name for f in listed.data.files}
        http.close()
    finally:
        run(backend.destroy(record.sandbox_id))
        run(backend.teardown(record.pool))


def test_concurrent_creates_of_different_sandboxes_run_in_parallel(pool_name, image):
    async def body():
        backend = DockerBackend(f"sat-{pool_name}")
        await backend.prepare(pool_name, image=image)  # the network exists: only the creates are timed
        returned: list[float] = []

        async def create():
            record = await backend.create(spec_for(pool_name, image))
            returned.append(time.time())
            return record

        records = await asyncio.gather(*(create() for _ in range(4)))
        assert len({r.container_id for r in records}) == 4
        assert len({r.url for r in records}) == 4  # every one got its own socket
        # Each create call asked the engine for its container (the label's time) before any of
        # the four calls returned: the backend never serialized them.
        asked = [float(r.labels["sandbox-actors.created-at"]) for r in records]
        assert max(asked) < min(returned), (sorted(asked), sorted(returned))
        await asyncio.gather(*(backend.destroy(r.sandbox_id) for r in records))
        await backend.teardown(pool_name)
        await backend.close()

    run(body())
