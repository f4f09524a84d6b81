"""The ``backend:`` part of a pool's config, one closed pydantic model per backend (the config's
discriminated union); each says what its backend can do and gives the plain settings the backend
builds itself from (:mod:`backends.specs`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import Capability
from .specs import DockerSpec, ProvisionerSpec, resolve

_KUBERNETES_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class DockerBackendConfig(_Closed):
    """Sandboxes are containers on the Docker engine of the node their SandboxActor runs on."""

    kind: Literal["docker"] = Field(default="docker", description="'docker' (the default) or 'provisioner'.")

    def spec(self) -> DockerSpec:
        return DockerSpec()

    @property
    def capabilities(self) -> frozenset[Capability]:
        return DockerSpec.backend.capabilities

    def check_prefix(self, prefix: str) -> None:
        """Docker takes any container name our config allows."""


class ProvisionerBackendConfig(_Closed):
    """Sandboxes come from a remote provisioner service (e.g. pods on Kubernetes)."""

    kind: Literal["provisioner"] = Field(description="'provisioner'.")
    url: str = Field(description="The provisioner's base URL, e.g. http://provisioner:8002.")
    api_key: str | None = Field(
        default=None, repr=False, description="X-API-Key sent on every call; '$NAME' is read from the host env."
    )
    create_timeout: float = Field(default=30, gt=0, description="Seconds a create call may take.")
    delete_timeout: float = Field(default=15, gt=0, description="Seconds a delete call may take.")
    request_timeout: float = Field(default=10, gt=0, description="Seconds a get, list or health call may take.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    def resolved_api_key(self, source: Mapping[str, str] | None = None) -> str:
        """``api_key`` with a ``$NAME`` value read from ``source`` (default: os.environ)."""
        return resolve(self.api_key or "", source)

    def spec(self) -> ProvisionerSpec:
        return ProvisionerSpec(self.url, self.api_key, self.create_timeout, self.delete_timeout, self.request_timeout)

    @property
    def capabilities(self) -> frozenset[Capability]:
        return ProvisionerSpec.backend.capabilities

    def check_prefix(self, prefix: str) -> None:
        """A provisioner's sandbox ids start with the prefix, and are Kubernetes names.

        Raises:
            ValueError: the prefix cannot start one.
        """
        if not _KUBERNETES_NAME.match(prefix):
            raise ValueError(
                "container_prefix: with a provisioner it starts sandbox ids, so it must be lower-case letters, "
                "digits and '-', starting with a letter (a Kubernetes name)"
            )


BackendConfig = DockerBackendConfig | ProvisionerBackendConfig


def shortcut(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``provisioner_url`` and ``provisioner_api_key`` (the original provider's keys) stand for a
    provisioner backend: the config's data with ``backend`` set from them.

    Raises:
        ValueError: both the shortcut and another ``backend`` were given.
    """
    if not data.get("provisioner_url"):
        return data
    wanted = {"kind": "provisioner", "url": str(data["provisioner_url"]).rstrip("/"),
              "api_key": data.get("provisioner_api_key")}
    given = data.get("backend")
    if given is not None:
        given = given.model_dump() if isinstance(given, BaseModel) else dict(given)
        if any(given.get(key) != value for key, value in wanted.items()):
            raise ValueError("set either provisioner_url (with provisioner_api_key) or backend, not both")
        return data  # the same thing said twice, e.g. a dumped config loaded again
    return {**data, "backend": wanted}
