"""TLS certificates, SuperNode keys and app signatures for Flower 1.42 deployments.

Book chapter ``book/deployment.md`` (deployment across hospitals: TLS, SuperNode
authentication, app verification). Everything here is offline: keys are generated
locally with ``cryptography`` and private keys are written with mode ``0o600``.

What Flower 1.42 expects (read from its source, checked on loopback by
``tests/test_fl_security.py``):

- **TLS** (:func:`make_test_pki`): ``flower-superlink --ssl-ca-certfile ca.crt
  --ssl-certfile server.pem --ssl-keyfile server.key`` takes PEM files (the key
  unencrypted, any format ``ssl``/uvicorn loads; PKCS#8 here). SuperNodes get
  ``--root-certificates ca.crt``; the ``flwr`` CLI gets ``root-certificates`` (an
  **absolute** path) in its ``[superlink.<name>]`` connection. The server
  certificate's subjectAltName must cover the address clients dial.
- **SuperNode authentication** (:func:`make_supernode_keypair`): an ECDSA key on a
  NIST curve in **OpenSSH** format — ``flower-supernode --auth-supernode-private-key``
  loads the private half with ``load_ssh_private_key`` (``-----BEGIN OPENSSH PRIVATE
  KEY-----``, unencrypted) and ``flwr supernode register KEY.pub CONNECTION`` the
  public half with ``load_ssh_public_key`` (``ecdsa-sha2-nistp384 AAAA… comment``).
  OpenSSH encodes P-256, P-384 and P-521 only; Flower itself uses P-384.
  ``ssh-keygen -t ecdsa -b 384 -N "" -f KEY`` makes the same files.
- **App verification** (:func:`make_app_signing_keypair`, :func:`sign_fab`,
  :func:`write_trusted_entities`): ``flower-supernode --trusted-entities FILE.yaml``
  maps public-key ids to Ed25519 OpenSSH public keys; a SuperNode with trusted
  entities runs a FAB only if the SuperLink hands it a verification record
  ``{public_key_id: {"signature": base64url(Ed25519(sign_at_8_bytes_big_endian ||
  sha256(fab))), "signed_at": unix_seconds}}`` plus ``"valid_license"``. In 1.42 the
  SuperLink attaches such records **only** to apps fetched from Flower Hub
  (``flwr run @account/app==x.y.z``, Platform API ``$FLWR_SUPERGRID_API_URL/hub/
  fetch-fab``); a FAB built from a local folder carries none and is refused by such a
  SuperNode. Signatures reach the Hub through ``flwr app review`` (needs a Flower
  account login).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "make_test_pki",
    "make_supernode_keypair",
    "make_app_signing_keypair",
    "sign_fab",
    "write_trusted_entities",
    "write_superlink_connection",
]

SupernodeCurve = Literal["secp256r1", "secp384r1", "secp521r1"]

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
}


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    """Write ``data`` to ``path``: mode 0o600 for private material, else 0o644."""
    mode = 0o600 if private else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through os.open
    return path


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_test_pki(
    out_dir: str | Path,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    *,
    days: int = 30,
) -> dict[str, Path]:
    """A throw-away CA and a SuperLink certificate signed by it (ECDSA P-256, PEM).

    Args:
        out_dir: folder for the four files (created if needed).
        hosts: what the server certificate's subjectAltName covers; IP literals become
            IP entries, everything else DNS entries. Must include the address that
            SuperNodes and ``flwr`` dial (``127.0.0.1`` on loopback).
        days: validity from now (the start is back-dated by 5 minutes for clock skew).

    Returns:
        ``{"ca_cert": ca.crt, "ca_key": ca.key, "server_cert": server.pem,
        "server_key": server.key}`` — pass them to ``flower-superlink
        --ssl-ca-certfile / --ssl-certfile / --ssl-keyfile`` and ``ca_cert`` to
        ``flower-supernode --root-certificates``. Keys are unencrypted PKCS#8 with mode
        0o600; for testing only (production uses the institution's PKI).
    """
    hosts = list(hosts)
    if not hosts:
        raise ValueError("make_test_pki: hosts must name at least one address")
    out = Path(out_dir)
    now = _dt.datetime.now(_dt.UTC)
    start, end = now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medlora test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, "medlora test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medlora test PKI"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem), private=False),
        "ca_key": _write(out / "ca.key", _pkcs8(ca_key), private=True),
        "server_cert": _write(
            out / "server.pem", server_cert.public_bytes(pem), private=False
        ),
        "server_key": _write(out / "server.key", _pkcs8(server_key), private=True),
    }


def make_supernode_keypair(
    out_dir: str | Path, name: str, *, curve: SupernodeCurve = "secp384r1"
) -> tuple[Path, Path]:
    """An ECDSA key pair that identifies one SuperNode, in OpenSSH format.

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -C NAME -f OUT_DIR/NAME``.

    Args:
        out_dir: folder for the two files (created if needed).
        name: file stem and the public key's comment (e.g. the site).
        curve: a NIST curve OpenSSH can encode (Flower accepts any NIST curve and
            generates P-384 itself).

    Returns:
        ``(OUT_DIR/NAME, OUT_DIR/NAME.pub)``: the private key (unencrypted ``OPENSSH
        PRIVATE KEY``, mode 0o600) for ``flower-supernode
        --auth-supernode-private-key``, and the public key (one line,
        ``ecdsa-sha2-nistp384 AAAA… NAME``) for ``flwr supernode register``.
    """
    if curve not in _CURVES:
        raise ValueError(
            f"make_supernode_keypair: curve {curve!r} is not one of {sorted(_CURVES)}"
        )
    key = ec.generate_private_key(_CURVES[curve]())
    return _write_openssh_pair(Path(out_dir), name, key)


def make_app_signing_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair for signing Flower apps (FABs), in OpenSSH format.

    Equivalent to ``ssh-keygen -t ed25519 -N "" -C NAME -f OUT_DIR/NAME`` — the key
    type ``flwr app review`` asks for and ``flower-supernode --trusted-entities``
    requires.

    Returns:
        ``(OUT_DIR/NAME, OUT_DIR/NAME.pub)``: private key (mode 0o600) and the
        one-line ``ssh-ed25519 AAAA… NAME`` public key.
    """
    return _write_openssh_pair(
        Path(out_dir), name, ed25519.Ed25519PrivateKey.generate()
    )


def _write_openssh_pair(
    out: Path, name: str, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> tuple[Path, Path]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return (
        _write(out / name, private, private=True),
        _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False),
    )


def sign_fab(
    fab: bytes,
    private_key_path: str | Path,
    public_key_id: str,
    *,
    signed_at: int | None = None,
) -> dict[str, str | int]:
    """Sign a FAB the way ``flwr app review`` does; return the Hub's verification record.

    The signed message is ``signed_at`` as 8 bytes big-endian followed by
    ``sha256(fab)``; the signature is Ed25519, base64url without padding.

    Args:
        fab: the FAB's bytes (``flwr build`` output, or
            ``flwr.cli.build.build_fab_from_disk(app_dir)``).
        private_key_path: an Ed25519 OpenSSH private key
            (:func:`make_app_signing_keypair`).
        public_key_id: the id the SuperNodes' trusted-entities file gives the key.
        signed_at: Unix seconds (default: now).

    Returns:
        ``{"public_key_id": ..., "signature": ..., "signed_at": ...}`` — one item of the
        ``verifications`` list the Platform API returns from ``/hub/fetch-fab``.
    """
    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"sign_fab: {private_key_path} is not an Ed25519 private key")
    when = int(time.time()) if signed_at is None else int(signed_at)
    message = when.to_bytes(8, "big") + hashlib.sha256(fab).digest()
    signature = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode()
    return {"public_key_id": public_key_id, "signature": signature, "signed_at": when}


def write_trusted_entities(
    path: str | Path, public_keys: Mapping[str, str | Path]
) -> Path:
    """Write a ``flower-supernode --trusted-entities`` YAML file.

    Args:
        path: the YAML file to write.
        public_keys: public-key id (e.g. ``"fpk_medlora_reviewer"``) -> path of an
            Ed25519 OpenSSH public key (:func:`make_app_signing_keypair`).

    Returns:
        ``path``; its content is ``{id: 'ssh-ed25519 AAAA… comment'}``, one line per key.
    """
    lines = []
    for key_id, pub in public_keys.items():
        text = Path(pub).read_text().strip()
        loaded = serialization.load_ssh_public_key(text.encode())
        if not isinstance(loaded, ed25519.Ed25519PublicKey):
            raise ValueError(f"write_trusted_entities: {pub} is not an Ed25519 key")
        if not key_id or any(c in key_id for c in ":'\"\n #"):
            raise ValueError(f"write_trusted_entities: bad key id {key_id!r}")
        lines.append(f"{key_id}: '{text}'\n")
    return _write(Path(path), "".join(lines).encode(), private=False)


def write_superlink_connection(
    flwr_home: str | Path,
    name: str,
    address: str,
    root_certificates: str | Path,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS connection for the ``flwr`` CLI.

    Produces ``[superlink.NAME]`` with ``address = "HOST:PORT"`` and
    ``root-certificates = "/abs/ca.crt"`` (Flower requires an absolute path); no
    ``insecure`` key, so the CLI verifies the SuperLink against that CA.

    Returns:
        The path of ``config.toml`` (an existing file is replaced).
    """
    ca = Path(root_certificates).expanduser().resolve()
    if not ca.is_file():
        raise FileNotFoundError(f"write_superlink_connection: no CA file at {ca}")
    text = (
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca.as_posix()}"\n'
    )
    return _write(Path(flwr_home) / "config.toml", text.encode(), private=False)
