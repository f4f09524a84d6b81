"""A pool's certificate authority for its egress proxy (see :mod:`.tls`): made on first use on
each node, kept under ``<base_dir>/egress-ca/<pool>``, never replaced (running sandboxes trust
it). Its key stays in ``ca.key`` (0600), beside, not inside, the ``public`` directory that
sandboxes mount read-only (``ca.pem``, and ``bundle.pem``: the node's trusted CAs and this one).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import BUNDLE

_CA_DAYS = 3650
_LEAF_DAYS = 30
_LEAVES_KEPT = 256


class EgressCA:
    """A pool's CA in ``directory`` (``ca.key``, 0600; ``public/ca.pem``; ``public/bundle.pem``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()  # the proxy makes certificates off its event loop, in threads

    @property
    def public(self) -> Path:
        """The directory a sandbox mounts (certificates only)."""
        return self.directory / "public"

    def ensure(self) -> EgressCA:
        """Make the CA unless it exists: whole or not at all (made aside, renamed into place; when
        two processes make it at once, the first rename wins and both use that one). Never
        replaced once made: a running sandbox trusts it."""
        if (self.directory / "ca.key").exists():
            return self
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}-", dir=self.directory.parent))
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sandbox-actors egress CA ({self.directory.name})")])
            now = datetime.datetime.now(datetime.timezone.utc)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                    .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False, encipher_only=False,
                                                 decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            key_path = staging / "ca.key"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            public = staging / "public"
            public.mkdir()
            ca_pem = cert.public_bytes(serialization.Encoding.PEM)
            (public / "ca.pem").write_bytes(ca_pem)
            (public / BUNDLE).write_bytes(_node_trust() + ca_pem)
            for path in (public, public / "ca.pem", public / BUNDLE):
                path.chmod(0o755 if path.is_dir() else 0o644)  # read by the sandbox's own user
            staging.chmod(0o755)
            try:
                os.rename(staging, self.directory)
            except OSError:
                if not (self.directory / "ca.key").exists():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self._key is None or self._cert is None:
            self.ensure()
            key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.directory / 'ca.key'} is not an EC key")
            self._key = key
            self._cert = x509.load_pem_x509_certificate((self.public / "ca.pem").read_bytes())
        return self._key, self._cert

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``name`` signed by this CA (made once
        per name and kept, the last few hundred)."""
        name = name.lower()
        with self._lock:
            found = self._leaves.get(name)
            if found is not None:
                self._leaves.move_to_end(name)
                return found
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols(["http/1.1"])  # the proxy reads HTTP/1.1 requests, one per connection
        with tempfile.TemporaryDirectory(prefix="leaf-") as scratch:  # ssl loads a chain from files only
            chain, private = Path(scratch) / "chain.pem", Path(scratch) / "key.pem"
            chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + ca_cert.public_bytes(serialization.Encoding.PEM))
            private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            context.load_cert_chain(chain, private)
        with self._lock:
            self._leaves[name] = context
            while len(self._leaves) > _LEAVES_KEPT:
                self._leaves.popitem(last=False)
        return context


def _node_trust() -> bytes:
    """The CAs this node trusts (its OpenSSL's default bundle), for a sandbox's bundle: the other
    allowed names pass through untouched and are verified by the sandbox against them."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            with contextlib.suppress(OSError):
                found = Path(candidate).read_bytes()
                return found if found.endswith(b"\n") else found + b"\n"
    return b""
