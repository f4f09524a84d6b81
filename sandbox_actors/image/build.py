"""Build the minimal sandbox image with no registry.

Two layers, each cached by a digest of its inputs:

1. a base root filesystem made by ``mmdebstrap`` from the host's own Debian
   package sources (python3 and procps on the 'essential' variant), imported
   with ``docker import`` as ``sandbox-actors-base:<suite>-<digest>``;
2. the sandbox image: the base plus our stdlib-only API server
   (``server.py``), built with a tiny Dockerfile and no pulls.

An image whose ``sandbox-actors.inputs`` label matches the current inputs is
reused as is, so a rebuild with nothing changed takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backends.images import ImageStore

from ..config import DEFAULT_IMAGE
from ..errors import SandboxError

BUILDER_VERSION = "1"
BASE_PACKAGES = ("python3", "procps")
INPUTS_LABEL = "sandbox-actors.inputs"
SERVER = Path(__file__).with_name("server.py")
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")

# Commands run as this user (the server stays root and switches to it for each command).
# Its uid is well away from the first login user's (1000), who often runs Ray on a host:
# that user must not own what the sandbox user may touch.
COMMAND_USER = "sandbox"
COMMAND_UID = 10000
API_SOCKET = "/run/sandbox-api/api.sock"
COMMAND_USERS = json.dumps(
    {"sandbox": {"uid": COMMAND_UID, "gid": COMMAND_UID, "home": "/home/sandbox"},
     "root": {"uid": 0, "gid": 0, "home": "/root"}},
    separators=(",", ":"),
)

DOCKERFILE = f"""\
FROM {{base}}
RUN echo '{COMMAND_USER}:x:{COMMAND_UID}:{COMMAND_UID}:sandbox:/home/{COMMAND_USER}:/bin/bash' >> /etc/passwd \\
 && echo '{COMMAND_USER}:x:{COMMAND_UID}:' >> /etc/group \\
 && mkdir -p /home/{COMMAND_USER} /run/sandbox-api \\
 && chown {COMMAND_UID}:{COMMAND_UID} /home/{COMMAND_USER} \\
 && chown -R {COMMAND_UID}:{COMMAND_UID} /usr/local
COPY server.py /opt/sandbox/server.py
RUN /usr/bin/python3 -I -S -c "import py_compile; py_compile.compile('/opt/sandbox/server.py', \\
    cfile='/opt/sandbox/server.pyc', doraise=True)"
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 SANDBOX_USER={COMMAND_USER}
LABEL sandbox-actors.api-socket="{API_SOCKET}" sandbox-actors.command-users='{COMMAND_USERS}'
WORKDIR /home/{COMMAND_USER}
EXPOSE 8080
CMD ["/usr/bin/python3", "-I", "-S", "-u", "/opt/sandbox/server.pyc"]
"""
# The server starts as root from a filesystem the agent wrote to (a resumed or forked sandbox's),
# and the agent owns /usr/local: so an absolute interpreter (not a python3 it put first on PATH),
# and neither site-packages (a .pth of its) nor PYTHON* variables (-I -S: the server needs the
# standard library only). It runs compiled at build time: compiling its source took ~11 ms of each
# sandbox's start here.


class ImageBuildError(SandboxError):
    """The image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class BuildResult:
    tag: str
    digest: str
    reused: bool
    seconds: float


def debian_suite() -> str:
    """The host's Debian codename (the image matches the host's package sources)."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or "bookworm"
    except OSError:
        pass
    return "bookworm"


def package_sources(suite: str) -> list[str]:
    """The host's apt source files that serve ``suite`` (handed to mmdebstrap as mirrors)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    found = []
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
        if any(suite in line for line in lines):
            found.append(str(path))
    return found


def _digest(*parts: str | bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else part.encode())
        sha.update(b"\0")
    return sha.hexdigest()


def base_digest(suite: str) -> str:
    return _digest(BUILDER_VERSION, suite, *BASE_PACKAGES, *_EXCLUDES)


def image_inputs_digest(suite: str | None = None) -> str:
    suite = suite or debian_suite()
    return _digest(base_digest(suite), DOCKERFILE, SERVER.read_bytes())


def build_image(
    tag: str = DEFAULT_IMAGE, *, force: bool = False, progress: Callable[[str], None] = print
) -> BuildResult:
    """Build (or reuse) the minimal sandbox image ``tag``.

    Args:
        tag: image name:tag to produce.
        force: rebuild both layers even when their inputs did not change.
        progress: called with one line per step.

    Raises:
        ImageBuildError: mmdebstrap is missing or failed, or the build failed.
        BackendUnavailable: the Docker engine did not answer.
    """
    started = time.monotonic()
    suite = debian_suite()
    digest = image_inputs_digest(suite)
    store = ImageStore()
    try:
        labels = store.labels(tag)
        if not force and labels is not None and labels.get(INPUTS_LABEL) == digest:
            progress(f"image {tag} is up to date (inputs {digest[:12]})")
            return BuildResult(tag, digest, True, time.monotonic() - started)
        base_tag = f"sandbox-actors-base:{suite}-{base_digest(suite)[:12]}"
        if force or store.labels(base_tag) is None:
            _build_base(store, base_tag, suite, progress)
        else:
            progress(f"[1/2] base {base_tag} is up to date")
        progress(f"[2/2] building {tag} from {base_tag} with the sandbox API server")
        store.build(
            tag,
            {"Dockerfile": DOCKERFILE.replace("{base}", base_tag).encode(), "server.py": SERVER.read_bytes()},
            {INPUTS_LABEL: digest, "sandbox-actors.project": "sandbox-actors"},
            progress=lambda line: progress(f"      {line}"),
        )
    finally:
        store.close()
    seconds = time.monotonic() - started
    progress(f"built {tag} in {seconds:.1f}s")
    return BuildResult(tag, digest, False, seconds)


def _build_base(store: ImageStore, base_tag: str, suite: str, progress: Callable[[str], None]) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ImageBuildError(
            "mmdebstrap is not installed; install it (`apt-get install -y mmdebstrap`) to build the image "
            "from Debian packages"
        )
    sources = package_sources(suite)
    if not sources:
        raise ImageBuildError(f"no apt source on this host serves Debian {suite!r} (looked in /etc/apt)")
    progress(f"[1/2] building base root filesystem: Debian {suite} + {', '.join(BASE_PACKAGES)} (mmdebstrap)")
    with tempfile.TemporaryDirectory(prefix="sandbox-actors-rootfs-") as tmp:
        tar_path = os.path.join(tmp, "rootfs.tar")
        command = [
            mmdebstrap,
            "--mode=auto",
            "--variant=essential",
            f"--include={','.join(BASE_PACKAGES)}",
            "--format=tar",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDES),
            "--aptopt=Acquire::Retries \"3\"",
            suite,
            tar_path,
            *sources,
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            if line.startswith(("I: ", "E: ", "W: ")):
                progress(f"      {line}")
        if process.wait() != 0:
            raise ImageBuildError(f"mmdebstrap failed (exit {process.returncode}):\n" + "\n".join(tail))
        progress(f"      importing root filesystem ({os.path.getsize(tar_path) // 2**20} MiB) as {base_tag}")
        store.import_rootfs(tar_path, base_tag, changes=['CMD ["/bin/bash"]'])
