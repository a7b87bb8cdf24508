"""TLS, SuperNode authentication and app verification of Flower 1.42 (book/deployment.md).

Unit tests check the files :mod:`medlora_lib.fl.security` writes against the loaders
Flower itself uses. The ``slow`` test starts a real deployment on loopback
(127.0.0.1, free ports, one ``FLWR_HOME`` per process, no ``--insecure`` anywhere):

* ``flower-superlink`` with TLS and ``--enable-supernode-auth``; keys registered with
  ``flwr supernode register``;
* SuperNodes A, B (plain) and E, F (``--trusted-entities``: E trusts the app's signer,
  F another key), all with ``--root-certificates`` and TLS on their own Runtime API;
* run 1: ``flwr run APP_DIR`` on A, B completes (FedAvg of 3 numbers, 2 rounds);
* run 2 (while run 1 runs): the same app as a signed "Hub" app (``flwr run
  @medlora/tinyapp==1.0.0``; a loopback HTTPS stand-in for Flower's Platform API
  serves FAB + signature): E runs it, F refuses it (``INVALID_FAB``);
* run 3 (after run 2): the unsigned local FAB on E, F: both refuse it;
* (a) SuperNode C with an unregistered key and (b) SuperNode D without the CA
  certificate exit within seconds with Flower exit code 305.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medlora_lib.fl.security import (
    make_app_signing_keypair,
    make_supernode_keypair,
    make_test_pki,
    sign_fab,
    write_superlink_connection,
    write_trusted_entities,
)

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- unit tests


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_make_test_pki_files_parse_and_chain(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    assert set(pki) == {"ca_cert", "ca_key", "server_cert", "server_key"}
    assert _mode(pki["ca_key"]) == 0o600 and _mode(pki["server_key"]) == 0o600
    assert _mode(pki["ca_cert"]) == 0o644

    ca = x509.load_pem_x509_certificate(pki["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(pki["server_cert"].read_bytes())
    ca_key = serialization.load_pem_private_key(pki["ca_key"].read_bytes(), None)
    server_key = serialization.load_pem_private_key(
        pki["server_key"].read_bytes(), None
    )

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca_key.public_key() == ca.public_key()
    assert server_key.public_key() == server.public_key()
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


@contextmanager
def _tls_echo_server(cert: Path, key: Path) -> Iterator[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)  # close() does not wake a blocked accept(): poll
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()


def test_test_pki_passes_a_real_tls_handshake(tmp_path: Path) -> None:
    """What uvicorn (server) and httpx (SuperNode, flwr CLI) do, with Python's ssl."""
    pki = make_test_pki(tmp_path)
    client = ssl.create_default_context(cafile=str(pki["ca_cert"]))
    with _tls_echo_server(pki["server_cert"], pki["server_key"]) as port:
        for name in ("127.0.0.1", "localhost"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.recv(2) == b"ok"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.wrap_socket(raw, server_hostname="fl.example.org")
        # system roots only (a SuperNode without --root-certificates): refused
        system = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                system.wrap_socket(raw, server_hostname="127.0.0.1")


def test_make_test_pki_custom_hosts(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hosts=("fl.example.org", "10.0.0.7"))
    server = x509.load_pem_x509_certificate(pki["server_cert"].read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    with pytest.raises(ValueError):
        make_test_pki(tmp_path, hosts=())


@pytest.mark.parametrize(
    ("curve", "cls"),
    [
        ("secp256r1", ec.SECP256R1),
        ("secp384r1", ec.SECP384R1),
        ("secp521r1", ec.SECP521R1),
    ],
)
def test_supernode_keypair_is_accepted_by_flower(
    tmp_path: Path, curve: Any, cls: type
) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    priv, pub = make_supernode_keypair(tmp_path, "site", curve=curve)
    assert (priv.name, pub.name) == ("site", "site.pub")
    assert _mode(priv) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pub.read_text().endswith(" site\n")
    assert pub.read_text().startswith(f"ecdsa-sha2-nistp{cls.key_size} ")

    key = serialization.load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, cls)
    # what `flower-supernode --auth-supernode-private-key` does
    private, public = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(priv), auth_supernode_public_key=None
        )
    )
    assert isinstance(private.curve, cls)
    # what `flwr supernode register` sends: the same public key
    assert try_load_public_key(pub) == public_key_to_bytes(public)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")
def test_supernode_keypair_matches_ssh_keygen(tmp_path: Path) -> None:
    """The book's ``ssh-keygen -t ecdsa -b 384`` and our files are interchangeable."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    priv, pub = make_supernode_keypair(tmp_path, "ours")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(priv)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert derived[:2] == pub.read_text().split()[:2]

    theirs = tmp_path / "theirs"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(theirs)],
        check=True,
        timeout=30,
    )
    _, public = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(theirs), auth_supernode_public_key=None
        )
    )
    assert isinstance(public.curve, ec.SECP384R1)
    assert try_load_public_key(Path(f"{theirs}.pub"))


def test_supernode_keypair_rejects_non_nist_curve(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_supernode_keypair(tmp_path, "site", curve="secp256k1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_supernode_keypair(tmp_path, "../escape")


def test_signed_fab_passes_flower_verification(tmp_path: Path) -> None:
    """Flower's own SuperNode check (``_verify_fab``) on a record from :func:`sign_fab`."""
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )
    from flwr.supernode.start_client_internal import _verify_fab

    priv, pub = make_app_signing_keypair(tmp_path, "reviewer")
    _, other_pub = make_app_signing_keypair(tmp_path, "stranger")
    assert _mode(priv) == 0o600 and pub.read_text().startswith("ssh-ed25519 ")
    key = serialization.load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)

    good = write_trusted_entities(tmp_path / "good.yaml", {"fpk_reviewer": pub})
    other = write_trusted_entities(tmp_path / "other.yaml", {"fpk_reviewer": other_pub})
    trusted_good = _try_obtain_trusted_entities(good)
    trusted_other = _try_obtain_trusted_entities(other)
    _validate_public_keys_ed25519(trusted_good)  # exits if a key is not Ed25519

    content = b"PK\x03\x04 not really a zip, any bytes are signed"
    record = sign_fab(content, priv, "fpk_reviewer", signed_at=1_750_000_000)
    assert record["signed_at"] == 1_750_000_000 and "=" not in str(record["signature"])
    verifications = _format_verification([dict(record)])  # what the SuperLink attaches
    assert verifications["valid_license"] == "Valid"
    fab = Fab("h", content, verifications)
    assert _verify_fab(fab, trusted_good)
    assert not _verify_fab(fab, trusted_other)
    assert not _verify_fab(Fab("h", content + b"!", verifications), trusted_good)

    ec_priv, ec_pub = make_supernode_keypair(tmp_path, "node")
    with pytest.raises(ValueError):  # an ECDSA SuperNode key cannot sign apps
        sign_fab(content, ec_priv, "fpk_node")
    with pytest.raises(ValueError):
        write_trusted_entities(tmp_path / "bad.yaml", {"fpk_node": ec_pub})


def test_superlink_connection_is_read_by_flwr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    pki = make_test_pki(tmp_path / "pki")
    home = tmp_path / "home"
    write_superlink_connection(home, "sec", "127.0.0.1:9999", pki["ca_cert"])
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("sec")
    assert conn.address == "127.0.0.1:9999"
    assert conn.root_certificates == str(pki["ca_cert"].resolve())
    assert conn.insecure is False


# -------------------------------------------------------------- loopback deployment

_TINY_APP = '''"""Tiny FedAvg app (medlora security test fixture): 3 numbers, weighted mean."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    x = msg.content["arrays"].to_numpy_ndarrays()[0]
    metrics = MetricRecord({"num-examples": pid + 1, "partition-id": pid})
    content = RecordDict({"arrays": ArrayRecord([x + (pid + 1)]), "metrics": metrics})
    return Message(content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = [int(n) for n in str(cfg["nodes"]).split()]
    deadline = time.time() + 60
    while not set(nodes) <= set(grid.get_node_ids()):
        if time.time() > deadline:
            raise RuntimeError(f"SuperNodes {nodes} did not all connect")
        time.sleep(0.2)
    x = np.zeros(3)
    out = {"rounds": []}
    for r in range(1, int(cfg["num-rounds"]) + 1):
        content = RecordDict(
            {"arrays": ArrayRecord([x]), "config": ConfigRecord({"server-round": r})}
        )
        msgs = [
            Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(r))
            for n in nodes
        ]
        ok, errors, weights, arrays = [], [], [], []
        for rep in grid.send_and_receive(msgs, timeout=60):
            if rep.has_error():
                errors.append(
                    {"node": rep.metadata.src_node_id, "code": rep.error.code,
                     "reason": rep.error.reason}
                )
                continue
            ok.append(int(rep.content["metrics"]["partition-id"]))
            weights.append(float(rep.content["metrics"]["num-examples"]))
            arrays.append(rep.content["arrays"].to_numpy_ndarrays()[0])
        if arrays:
            x = np.average(np.stack(arrays), axis=0, weights=weights)
        out["rounds"].append(
            {"round": r, "ok": sorted(ok), "errors": errors, "x": x.tolist()}
        )
    Path(str(cfg["out-path"])).write_text(json.dumps(out))
'''

_TINY_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
description = "medlora security test fixture"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medlora"

[tool.flwr.app.components]
serverapp = "tinyapp:server_app"
clientapp = "tinyapp:client_app"

[tool.flwr.app.config]
nodes = ""
num-rounds = 2
out-path = ""
"""


def _write_tiny_app(app_dir: Path, description: str = "local build") -> Path:
    app_dir.mkdir(parents=True)
    (app_dir / "tinyapp.py").write_text(_TINY_APP)
    (app_dir / "pyproject.toml").write_text(
        _TINY_PYPROJECT.replace("medlora security test fixture", description)
    )
    return app_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class _Procs:
    """Processes started in their own sessions; stopped by PID (and their children)."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.cmds: dict[str, list[str]] = {}
        self.seen_cmdlines: set[str] = set()
        self._files: list[Any] = []

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(
        self,
        name: str,
        cmd: list[str],
        extra_env: dict[str, str] | None = None,
        home: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        home = home or self.work / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        fh = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(fh)
        proc = subprocess.Popen(
            cmd,
            env={**self.env, **(extra_env or {}), "FLWR_HOME": str(home)},
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=self.work,
            start_new_session=True,
        )
        self.procs[name], self.cmds[name] = proc, cmd
        return proc

    def sample_cmdlines(self) -> None:
        """Record the command line of every process in the trees we started."""
        import psutil

        for proc in list(self.procs.values()):
            try:
                parent = psutil.Process(proc.pid)
                for p in [parent, *parent.children(recursive=True)]:
                    self.seen_cmdlines.add(" ".join(p.cmdline()))
            except psutil.Error:
                continue

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every process and the helpers Flower detached (the library's stop)."""
        from medlora_lib.fl.runner import stop_processes

        stop_processes(list(self.procs.values()), grace=grace)
        for fh in self._files:
            fh.close()


class _HubStub:
    """Loopback HTTPS stand-in for Flower's Platform API (``/hub/fetch-fab``).

    Serves one FAB and its verification records the way Flower Hub does after
    ``flwr app review``; the SuperLink reaches it through ``FLWR_SUPERGRID_API_URL``.
    """

    def __init__(
        self, fab: bytes, verifications: list[dict[str, Any]], pki: dict[str, Path]
    ) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.requests.append(("POST", self.path, body))
                if self.path != "/hub/fetch-fab":
                    self.send_error(404)
                    return
                reply = {"fab_url": f"{stub.url}/fab", "verifications": verifications}
                self._send(json.dumps(reply).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                stub.requests.append(("GET", self.path, None))
                self._send(fab, "application/octet-stream")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _flwr(
    args: list[str], home: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env={**env, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def _flwr_json(out: str) -> Any:
    """The JSON object ``flwr ... --format json`` prints (after any other lines)."""
    start = out.index("{")
    return json.loads(out[start:])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_loopback_deployment_tls_node_auth_and_app_verification(
    tmp_path: Path,
) -> None:
    pytest.importorskip("psutil")  # installed with flwr[simulation]
    from flwr.cli.build import build_fab_from_disk

    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (BIN / exe).exists():
            pytest.skip(f"{exe} is not installed next to {sys.executable}")
    t_start = time.perf_counter()
    phases: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        phases.append((what, time.perf_counter() - t_start))

    work = tmp_path / "medlora-fl-security"
    work.mkdir()
    pki = make_test_pki(work / "pki")
    keys = work / "keys"
    node_keys = {n: make_supernode_keypair(keys, n) for n in "ABCDEF"}
    signer, signer_pub = make_app_signing_keypair(keys, "reviewer")
    _, stranger_pub = make_app_signing_keypair(keys, "stranger")
    trust_good = write_trusted_entities(
        work / "trust-good.yaml", {"fpk_reviewer": signer_pub}
    )
    trust_other = write_trusted_entities(
        work / "trust-other.yaml", {"fpk_stranger": stranger_pub}
    )
    app_dir = _write_tiny_app(work / "app")
    # The "Hub" FAB must not be byte-identical to the local one: the SuperLink keeps
    # one verification record per FAB hash, last writer wins (sql_corestate.store_fab),
    # so an unsigned `flwr run` of the same bytes would strip the signature.
    fab = build_fab_from_disk(_write_tiny_app(work / "app-hub", "Hub build"))
    assert fab != build_fab_from_disk(app_dir)
    hub = _HubStub(fab, [sign_fab(fab, signer, "fpk_reviewer")], pki)

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # no call to api.flower.ai at start-up
        "FLWR_TELEMETRY_ENABLED": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    link_port = _free_port()
    address = f"127.0.0.1:{link_port}"
    cli_home = work / "home-cli"
    write_superlink_connection(cli_home, "sec", address, pki["ca_cert"])
    procs = _Procs(work, env)
    sampler_stop = threading.Event()

    def sampler() -> None:
        while not sampler_stop.wait(0.25):
            procs.sample_cmdlines()

    sampler_thread = threading.Thread(target=sampler, daemon=True)
    try:
        link = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(pki["ca_cert"]),
                "--ssl-certfile",
                str(pki["server_cert"]),
                "--ssl-keyfile",
                str(pki["server_key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
            extra_env={
                "FLWR_SUPERGRID_API_URL": hub.url,  # the Hub stand-in
                "REQUESTS_CA_BUNDLE": str(pki["ca_cert"]),  # trust it (and only it)
            },
        )
        sampler_thread.start()

        def link_up() -> bool:
            assert link.poll() is None, procs.log("superlink")
            return "Uvicorn running on https://" in procs.log("superlink")

        _wait_for(link_up, 30, "the SuperLink")
        mark("SuperLink up")

        # register A, B, D, E, F (not C) through the Control API, in parallel
        for n in "ABDEF":
            procs.start(
                f"register{n}",
                [
                    str(BIN / "flwr"),
                    "supernode",
                    "register",
                    str(node_keys[n][1]),
                    "sec",
                    "--format",
                    "json",
                ],
                home=cli_home,
            )
        node_id = {}
        for n in "ABDEF":
            reg = procs.procs[f"register{n}"]
            reg.wait(timeout=60)
            assert reg.returncode == 0, procs.log(f"register{n}")
            node_id[n] = int(_flwr_json(procs.log(f"register{n}"))["node-id"])
        mark("5 keys registered")

        def supernode(name: str, partition: int, *extra: str) -> None:
            procs.start(
                f"supernode{name}",
                [
                    str(BIN / "flower-supernode"),
                    "--superlink",
                    address,
                    "--auth-supernode-private-key",
                    str(node_keys[name][0]),
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={partition} num-partitions=2",
                    *extra,
                ],
            )

        tls = ["--root-certificates", str(pki["ca_cert"])]
        # the SuperNode's own Runtime API (for its flower-superexec) over TLS as well
        runtime_tls = [
            "--ssl-certfile",
            str(pki["server_cert"]),
            "--ssl-keyfile",
            str(pki["server_key"]),
            "--ssl-ca-certfile",
            str(pki["ca_cert"]),
        ]
        supernode("A", 0, *tls, *runtime_tls)
        supernode("B", 1, *tls, *runtime_tls)
        supernode("C", 0, *tls, *runtime_tls)  # (a) key not registered
        supernode("D", 1, *runtime_tls)  # (b) no --root-certificates: system roots
        supernode("E", 0, *tls, *runtime_tls, "--trusted-entities", str(trust_good))
        supernode("F", 1, *tls, *runtime_tls, "--trusted-entities", str(trust_other))

        # (a) and (b): refused within seconds, Flower exit code 305, process status 1
        for n in "CD":
            p = procs.procs[f"supernode{n}"]
            try:
                p.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"SuperNode {n} still running:\n{procs.log('supernode' + n)}"
                )
            assert p.returncode == 1, procs.log(f"supernode{n}")
            mark(f"SuperNode {n} exited")
        log_c, log_d = procs.log("supernodeC"), procs.log("supernodeD")
        assert "Exit Code: 305" in log_c and "Failed to activate SuperNode" in log_c
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        assert "Exit Code: 305" in log_d and "CERTIFICATE_VERIFY_FAILED" in log_d
        assert "SuperNode ID" not in log_c + log_d
        assert f"Activated node_id={node_id['D']}" not in procs.log("superlink")

        for n in "ABEF":
            _wait_for(
                lambda n=n: f"SuperNode ID: {node_id[n]}" in procs.log(f"supernode{n}"),
                45,
                f"SuperNode {n} to connect",
            )
        mark("SuperNodes A, B, E, F connected")

        def flwr_run(name: str, app: str, nodes: list[int], rounds: int = 2) -> None:
            procs.start(
                name,
                [
                    str(BIN / "flwr"),
                    "run",
                    app,
                    "sec",
                    "--stream",
                    "-c",
                    f'nodes="{" ".join(map(str, nodes))}"',
                    "-c",
                    f'out-path="{work / name}.json"',
                    "-c",
                    f"num-rounds={rounds}",
                ],
                home=cli_home,
            )

        def finish(name: str) -> dict:
            try:
                procs.procs[name].wait(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`flwr run` ({name}) still running:\n{procs.log(name)}")
            assert procs.procs[name].returncode == 0, procs.log(name)
            assert "Successfully started run" in procs.log(name), procs.log(name)
            return json.loads((work / f"{name}.json").read_text())

        # run 1: the local app folder on A, B; at the same time, on E and F:
        # run 2: the signed Hub app (E trusts its signer, F another key), then
        # run 3: the unsigned local FAB
        flwr_run("run1", str(app_dir), [node_id["A"], node_id["B"]])
        flwr_run("run2", "@medlora/tinyapp==1.0.0", [node_id["E"], node_id["F"]])
        r2 = finish("run2")
        fetches = [b for m, path, b in hub.requests if path == "/hub/fetch-fab"]
        assert [(b["app_id"], b["app_version"]) for b in fetches] == [
            ("@medlora/tinyapp", "1.0.0")
        ]
        assert [r["ok"] for r in r2["rounds"]] == [[0], [0]]
        for r in r2["rounds"]:
            assert [(e["node"], e["code"]) for e in r["errors"]] == [(node_id["F"], 7)]
        assert r2["rounds"][-1]["x"] == pytest.approx([2.0] * 3)
        assert "FAB verification failed" in procs.log("supernodeF")
        assert "FAB verification failed" not in procs.log("supernodeE")
        mark("run 2 (signed Hub app on E, F) done")

        flwr_run("run3", str(app_dir), [node_id["E"], node_id["F"]], rounds=1)
        r3 = finish("run3")
        assert r3["rounds"][0]["ok"] == []
        assert sorted(e["code"] for e in r3["rounds"][0]["errors"]) == [7, 7]
        for n in "EF":
            assert "App verification is not supported by the connected SuperLink" in (
                procs.log(f"supernode{n}")
            )
        mark("run 3 (unsigned app on E, F) done")

        r1 = finish("run1")
        assert [r["ok"] for r in r1["rounds"]] == [[0, 1], [0, 1]]
        assert all(not r["errors"] for r in r1["rounds"])
        assert r1["rounds"][-1]["x"] == pytest.approx([10 / 3] * 3)
        mark("run 1 (local app on A, B) done")

        runs = _flwr_json(
            _flwr(["ls", "sec", "--format", "json"], cli_home, env).stdout
        )
        assert [r["status"] for r in runs["runs"]] == ["finished:completed"] * 3
        for name in ("run1", "run2", "run3"):
            assert "insecure" not in procs.log(name).lower()

        # (c) no --insecure on any command line (ours or Flower's helpers) or in logs
        procs.sample_cmdlines()
        (work / "cmdlines.txt").write_text("\n".join(sorted(procs.seen_cmdlines)))
        flower_cmds = [c for c in procs.seen_cmdlines if "flower-superexec" in c]
        assert len(flower_cmds) >= 5  # SuperLink's + one per running SuperNode
        assert not [c for c in procs.seen_cmdlines if "--insecure" in c]
        assert not [c for c in procs.cmds.values() if "--insecure" in c]
        assert "insecure" not in (cli_home / "config.toml").read_text()
        for name in procs.procs:
            assert "Option `--insecure` was set" not in procs.log(name)
    finally:
        sampler_stop.set()
        procs.stop_all()
        hub.close()
        if sampler_thread.is_alive():
            sampler_thread.join(timeout=5)
    mark("all stopped")
    elapsed = time.perf_counter() - t_start
    print("\n" + "\n".join(f"{t:6.1f} s  {what}" for what, t in phases))
    assert elapsed < 170  # about 55 s on 2 idle cores; the timeout mark is the cap
