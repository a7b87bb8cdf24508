"""Start Flower's processes on loopback and run ``flwr run`` (chapter ``book/deployment.md``).

Everything that runs a federation — :func:`medlora_lib.fl.simulate`, ``medlora run``,
``medlora deploy`` and the tests — goes through ``flwr run <project> <connection>``,
exactly as a Flower user types it, against a SuperLink started here:

* :class:`LoopbackSuperLink` — ``flower-superlink`` on 127.0.0.1 (free ports, its own
  ``FLWR_HOME``), in simulation mode (``--simulation``: the Simulation Runtime, one
  virtual SuperNode per site) or as a Deployment Runtime (then SuperNodes connect to
  it), plain HTTP on loopback or TLS (``tls=`` the paths of
  :func:`medlora_lib.fl.security.make_test_pki`);
* :func:`start_supernode` — one ``flower-supernode`` with its node config;
* :func:`flwr_run` — the CLI, with the connection written to a private
  ``FLWR_HOME/config.toml`` (the user's ``~/.flwr`` is never touched) and the
  experiment as a run-config TOML file.

Every process runs in its own session and is stopped by its PID (and its children's)
when the context ends, on an error and on Ctrl-C. Nothing binds to anything but
127.0.0.1; Ray (the Simulation Runtime's backend) is told to use the loopback address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medlora_lib.errors import ConfigError, MedloraError

__all__ = [
    "DeploymentError",
    "LoopbackSuperLink",
    "flwr_env",
    "flwr_run",
    "free_port",
    "project_dir",
    "staged_app",
    "start_supernode",
    "stop_processes",
    "write_run_config",
]


class DeploymentError(MedloraError, RuntimeError):
    """A Flower process failed (the message names its log and quotes its end)."""


def project_dir() -> Path:
    """The Flower App folder (the repository holding ``pyproject.toml``).

    Raises:
        ConfigError: ``medlora_lib`` was installed without its project folder.
    """
    root = Path(__file__).resolve().parents[2]
    toml = root / "pyproject.toml"
    if not toml.exists() or "[tool.flwr.app]" not in toml.read_text():
        raise ConfigError(
            f"no Flower App folder next to the installed medlora_lib ({root}); clone "
            "the repository and install it with `pip install -e .` (flwr run needs "
            "the app's pyproject.toml)"
        )
    return root


def staged_app(root: Path, into: Path) -> Path:
    """The folder ``flwr run`` bundles: ``root``'s bundle files copied into ``into``, or
    ``root`` itself when its ``pyproject.toml`` sets no ``[tool.flwr.app] fab-include``.

    ``flwr run APP`` first lists *every* file under ``APP`` (``os.walk``, a ``resolve``
    per file) and only then filters them by ``.gitignore`` and ``fab-include``. In a
    checkout with its ``.venv`` and run cache that is ~69,000 files and ~18 s of CPU on
    every run here, for a bundle of two files (``pyproject.toml``, ``README.md``). This
    walks the tree without descending into the folders ``.gitignore`` ignores and copies the files ``fab-include`` names (and ``.gitignore``), so Flower
    builds the very same FAB — same bytes, same hash (``tests/test_fl_runner.py``
    compares it with Flower's own build of ``root``) — in milliseconds. ``flwr run .``
    typed by hand still works on the checkout itself, only slower.
    """
    import shutil
    import tomllib
    import warnings

    import pathspec

    root = Path(root)
    config = tomllib.loads((root / "pyproject.toml").read_text())
    include = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not include:
        return root
    gitignore = root / ".gitignore"
    ignore_lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    with warnings.catch_warnings():  # Flower's own pattern style, deprecated name
        warnings.simplefilter("ignore", DeprecationWarning)
        ignored = pathspec.PathSpec.from_lines("gitwildmatch", ignore_lines)
        wanted = pathspec.PathSpec.from_lines("gitwildmatch", include)
    keep = ["pyproject.toml"] + ([".gitignore"] if gitignore.exists() else [])
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if not ignored.match_file(f"{(rel / d).as_posix()}/")
        )
        for name in filenames:
            path = (rel / name).as_posix()
            if path not in keep and wanted.match_file(path):
                if not ignored.match_file(path) and not (root / path).is_symlink():
                    keep.append(path)
    into = Path(into)
    if into.exists():
        shutil.rmtree(into)
    for path in keep:
        (into / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / path, into / path)
    return into


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def flwr_env(home: Path | None = None) -> dict[str, str]:
    """The environment every Flower process gets here."""
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # Ray on Linux picks the machine's address unless told otherwise
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DEDUP_LOGS": "0",
        # Flower starts helpers (flower-superexec, ...) by name: the venv's bin first
        "PATH": str(Path(sys.executable).parent)
        + os.pathsep
        + os.environ.get("PATH", ""),
    }
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _descendants(pids: list[int]) -> list[int]:
    try:
        import psutil  # installed with flwr[simulation] (Ray)
    except ImportError:  # pragma: no cover
        return []
    out = []
    for pid in pids:
        try:
            out += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
    return out


def stop_processes(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process (and the processes they started), SIGKILL after ``grace``."""
    alive = [p for p in procs if p.poll() is None]
    children = _descendants([p.pid for p in alive])
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for p in reversed(alive):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.time() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _start(
    cmd: list[str], home: Path, log: Path, cwd: Path | None = None
) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - the child holds it; closed when it exits
    try:
        return subprocess.Popen(
            cmd,
            env=flwr_env(home),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=str(cwd or home),
            start_new_session=True,
        )
    finally:
        fh.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_port(
    port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60
) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise DeploymentError(
                f"{what} exited with status {proc.returncode}; see {log}:\n"
                + _tail(log, 2000)
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(
        f"{what} did not open port {port} in {timeout:g} s; see {log}"
    )


class LoopbackSuperLink:
    """A ``flower-superlink`` on 127.0.0.1 (a context manager that stops it).

    Args:
        work: folder for its ``FLWR_HOME``, database and log.
        simulation: run the Simulation Runtime (no SuperNodes connect).
        tls: ``{"ca", "cert", "key"}`` PEM paths; None = plain HTTP (``--insecure``,
            acceptable only because nothing leaves the loopback interface).
        supernode_auth: ``--enable-supernode-auth`` (register keys with
            :meth:`register`).
        port: the HTTP API port (default: a free one).
        database: keep the SuperLink's state in this file (default: in memory).
    """

    def __init__(
        self,
        work: Path,
        simulation: bool = False,
        tls: dict[str, Path] | None = None,
        supernode_auth: bool = False,
        port: int | None = None,
        database: Path | None = None,
    ) -> None:
        self.work = Path(work)
        self.simulation = simulation
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.port = port or free_port()
        self.database = database
        self.home = self.work / "superlink-home"
        self.log = self.work / "superlink.log"
        self.cli_home = self.work / "cli-home"
        self.proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [_bin("flower-superlink")]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile", str(self.tls["ca"]),
                "--ssl-certfile", str(self.tls["cert"]),
                "--ssl-keyfile", str(self.tls["key"]),
            ]  # fmt: skip
        else:
            cmd += ["--insecure"]
        if self.simulation:
            cmd += ["--simulation"]
        if self.supernode_auth:
            cmd += ["--enable-supernode-auth"]
        cmd += [
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--health-server-address", f"127.0.0.1:{free_port()}",
        ]  # fmt: skip
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        return cmd

    def start(self) -> LoopbackSuperLink:
        self.work.mkdir(parents=True, exist_ok=True)
        self.proc = _start(self.command(), self.home, self.log)
        self.procs.append(self.proc)
        _wait_port(self.port, self.proc, self.log, "the SuperLink")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            'default = "medlora"',
            "",
            "[superlink.medlora]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            lines.append(f'root-certificates = "{self.tls["ca"]}"')
        else:
            lines.append("insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")
        return self

    def register(self, public_key: Path) -> str:
        """``flwr supernode register KEY medlora`` (SuperNode authentication)."""
        res = subprocess.run(
            [_bin("flwr"), "supernode", "register", str(public_key), "medlora"],
            env=flwr_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise DeploymentError(
                f"`flwr supernode register {public_key}` failed:\n{res.stdout}{res.stderr}"
            )
        return res.stdout

    def stop(self) -> None:
        stop_processes(self.procs)

    def __enter__(self) -> LoopbackSuperLink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_supernode(
    link: LoopbackSuperLink,
    work: Path,
    node_config: dict[str, Any],
    name: str,
    private_key: Path | None = None,
    root_certificates: Path | None = None,
    trusted_entities: Path | None = None,
) -> subprocess.Popen:
    """Start one ``flower-supernode`` connected to ``link`` (log: ``work/<name>.log``)."""
    cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    cmd = [_bin("flower-supernode"), "--superlink", link.address]
    if link.tls:
        # the CA to trust the SuperLink, and a certificate for the SuperNode's own
        # local API (else its helper process falls back to --insecure on loopback)
        cmd += ["--root-certificates", str(root_certificates or link.tls["ca"])]
        cmd += [
            "--ssl-certfile", str(link.tls["cert"]),
            "--ssl-keyfile", str(link.tls["key"]),
            "--ssl-ca-certfile", str(link.tls["ca"]),
        ]  # fmt: skip
    else:
        cmd += ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(trusted_entities)]
    cmd += [
        "--host", "127.0.0.1",
        "--port", str(free_port()),
        "--health-server-address", f"127.0.0.1:{free_port()}",
        "--node-config", cfg,
    ]  # fmt: skip
    proc = _start(cmd, Path(work) / f"{name}-home", Path(work) / f"{name}.log")
    link.procs.insert(0, proc)
    return proc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_run_config(path: Path, run_config: dict[str, Any]) -> Path:
    """Write a run config as the TOML file ``flwr run --run-config FILE`` takes."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(dict(run_config)))
    os.replace(tmp, path)
    return path


def flwr_run(
    link: LoopbackSuperLink,
    run_config: Path | list[str] | None = None,
    federation_config: str | None = None,
    *,
    app_dir: Path | None = None,
    log: Path | None = None,
    verbose: bool = False,
    timeout: float | None = None,
) -> int:
    """``flwr run APP medlora --stream [--run-config ...] [--federation-config ...]``.

    Blocks until the run ends (``--stream`` follows its log). The output goes to
    ``log`` and, with ``verbose``, to this process's stdout as well.

    Returns:
        The CLI's exit status.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after stopping the CLI (the run folder's last
            checkpoint is kept: run again to resume).
        DeploymentError: ``timeout`` passed.
    """
    app = app_dir or staged_app(project_dir(), link.work / "app")
    cmd = [_bin("flwr"), "run", str(app), "medlora", "--stream"]
    if isinstance(run_config, Path):
        cmd += ["--run-config", str(run_config)]
    elif run_config:
        cmd += ["--run-config", " ".join(run_config)]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    log = log or (link.work / "flwr-run.log")
    proc = subprocess.Popen(
        cmd,
        env=flwr_env(link.cli_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(link.work),
        start_new_session=True,
        text=True,
        bufsize=1,
    )
    link.procs.append(proc)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with open(log, "a") as fh:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if verbose:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    raise DeploymentError(
                        f"`flwr run` passed its time-out of {timeout:g} s; see {log} and "
                        f"{link.log}"
                    )
        return proc.wait()
    except KeyboardInterrupt:
        stop_processes([proc])
        raise
