"""Local image operations on a Docker engine: inspect labels, import a root
filesystem, build from an in-memory context. Never pulls."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Mapping

import docker
import docker.errors

from .engine import connect, engine_errors
from .errors import BackendError, ImageNotFound


class ImageStore:
    """Images on one engine (``base_url`` None: the environment's engine)."""

    def __init__(self, base_url: str | None = None, timeout: float = 600.0) -> None:
        self._client = connect(base_url, timeout)

    def close(self) -> None:
        self._client.close()

    def labels(self, tag: str) -> dict[str, str] | None:
        """The image's labels, or None when the engine has no such image."""
        with engine_errors(f"inspect image {tag}"):
            try:
                image = self._client.images.get(tag)
            except docker.errors.ImageNotFound:
                return None
        return dict(image.labels or {})

    def image_id(self, tag: str) -> str | None:
        with engine_errors(f"inspect image {tag}"):
            try:
                return self._client.images.get(tag).id
            except docker.errors.ImageNotFound:
                return None

    def remove_if_unused(self, image_id: str) -> bool:
        """Remove an image no container uses; False when it is in use or gone."""
        with engine_errors(f"remove image {image_id[:19]}"):
            try:
                self._client.images.remove(image_id)
            except docker.errors.APIError:
                return False  # in use by a container (409) or already gone (404)
        return True

    def import_rootfs(self, tar_path: str, tag: str, changes: list[str]) -> None:
        """``docker import`` a root filesystem tarball as ``tag``."""
        repository, _, version = tag.rpartition(":")
        with engine_errors(f"import {tar_path} as {tag}"):
            self._client.api.import_image_from_file(tar_path, repository=repository, tag=version, changes=changes)
        if self.labels(tag) is None:
            raise BackendError(f"import of {tar_path} did not produce image {tag}")

    def build(
        self,
        tag: str,
        files: Mapping[str, bytes],
        labels: Mapping[str, str],
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        """Build ``tag`` from a context of ``files`` (one must be 'Dockerfile'); no pulls. The image
        the tag named before is removed when no container uses it (and with it its untagged
        parents that nothing else uses: a rebuilt base image once its last child goes), so that
        rebuilds leave no dangling images behind."""
        previous = self.image_id(tag)
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(data))
        context.seek(0)
        with engine_errors(f"build image {tag}"):
            try:
                stream = self._client.api.build(
                    fileobj=context, custom_context=True, tag=tag, labels=dict(labels), rm=True, pull=False,
                    decode=True,
                )
                for chunk in stream:
                    if "error" in chunk:
                        raise BackendError(f"building {tag} failed: {chunk['error'].strip()}")
                    line = str(chunk.get("stream", "")).strip()
                    if line:
                        progress(line)
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(f"base image for {tag} is missing: {exc.explanation}") from exc
        if previous is not None and previous != self.image_id(tag) and self.remove_if_unused(previous):
            progress(f"removed the previous {tag} ({previous[7:19]})")
