"""The controller's private CA and server certificate (TLS by default).

`hnv-controller init` calls `ensure_tls(state_dir, names, addresses)`, which creates, when
they are missing, in DIR/tls/:

- ca.key (0600) and ca.crt: a private certificate authority, valid 10 years, that signs
  only this controller's server certificate. ca.crt is what agents and hnvctl are given
  (`--ca-file`, `HNV_CA_FILE`) to verify the controller; it holds no secret.
- server.key (0600) and server.crt: the server certificate, valid 2 years, for the DNS
  names and IP addresses given (subjectAltName), signed by the CA.

Existing files are kept (agents already trust that CA); to issue a server certificate
for other names, delete server.crt and server.key and run init again with the names.
Keys are EC P-256, created owner-only from the first byte. Everything cryptographic is
the `cryptography` library's; this module only chooses names, lifetimes and files.

This module owns the files under DIR/tls; it knows nothing of tokens, HTTP or the fabric.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=730)


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def server_ready(self) -> bool:
        return self.server_cert.exists() and self.server_key.exists()


def tls_files(state_dir: str | os.PathLike[str]) -> TlsFiles:
    return TlsFiles(Path(state_dir) / "tls")


def default_names() -> list[str]:
    """The names a server certificate gets when init is given none."""
    names = [socket.gethostname(), "localhost"]
    fqdn = socket.getfqdn()
    if fqdn not in names and "." in fqdn:
        names.append(fqdn)
    return names


DEFAULT_ADDRESSES = ("127.0.0.1", "::1")


def ensure_tls(state_dir: str | os.PathLike[str], names: list[str], addresses: list[str]) -> tuple[TlsFiles, list[str]]:
    """Create the CA and the server certificate where missing; (files, what was created)."""
    files = tls_files(state_dir)
    files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.directory, 0o700)
    parsed = [ipaddress.ip_address(address) for address in addresses]  # ValueError names the bad one
    created: list[str] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"openhnv controller CA {socket.gethostname()}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(files.ca_key, ca_key)
        _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        created.append(str(files.ca_cert))
        # A new CA invalidates any server certificate signed by an old one.
        for stale in (files.server_cert, files.server_key):
            stale.unlink(missing_ok=True)
    if not files.server_ready():
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        alt_names = [x509.DNSName(name) for name in dict.fromkeys(names)]
        alt_names += [x509.IPAddress(address) for address in dict.fromkeys(parsed)]
        common_name = names[0] if names else str(parsed[0]) if parsed else "openhnv-controller"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + SERVER_LIFETIME)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(files.server_key, key)
        _write_public(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        created.append(str(files.server_cert))
    return files, created


def server_names(files: TlsFiles) -> list[str]:
    """The DNS names and addresses the server certificate is valid for (for the log)."""
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*alt.get_values_for_type(x509.DNSName), *map(str, alt.get_values_for_type(x509.IPAddress))]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Created with its final mode (a key is never readable by others, not even briefly),
    then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
