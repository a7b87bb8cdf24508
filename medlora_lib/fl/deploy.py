"""``medlora deploy``: the project's Flower App on a loopback Deployment Runtime.

Book chapter ``book/deployment.md``. A thin launcher around ``flwr run .``: on
127.0.0.1 it

1. splits the prepared data into one folder per site (:func:`~medlora_lib.fl.sites.split_into_sites`,
   hard links) — what each hospital would hold;
2. starts ``flower-superlink`` (Deployment Runtime, its state in ``WORK/superlink.db``),
   with TLS when ``tls=True`` (a CA and server certificate made for the run) and
   SuperNode authentication when ``supernode_auth=True`` (a key pair per site,
   registered with ``flwr supernode register``);
3. starts one ``flower-supernode`` per site with ``--node-config
   "data-path=WORK/sites-data/<site> state-dir=WORK/sites-state/<site>"``;
4. runs ``flwr run <project> medlora --run-config WORK/run-config.toml --stream``, the
   run config being the experiment (plus ``fed.num-sites`` = the number of sites and
   ``run.dir=WORK/run``);
5. reads the result the ServerApp wrote to ``WORK/run`` and stops every process.

A SuperNode that dies does not stop the run (the round goes on with the others); on a
failure or a time-out the work folder — logs, the checkpoints of every finished round —
is kept and named in the error, and running again with the same ``work_dir`` resumes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from medlora_lib.config import ExperimentConfig, RunOptions, to_run_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl.runner import (
    DeploymentError,
    LoopbackSuperLink,
    _tail,
    flwr_run,
    start_supernode,
    write_run_config,
)

__all__ = ["deploy", "DeploymentError", "Deployment"]


class Deployment:
    """The processes of a loopback deployment (SuperLink + one SuperNode per site).

    Kept separate from :func:`deploy` so that tests can kill and restart a SuperNode
    or the SuperLink in the middle of a run.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        work: Path,
        *,
        tls: bool = False,
        supernode_auth: bool = False,
        port: int | None = None,
        record_messages: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        from medlora_lib.adapters import METHODS
        from medlora_lib.fl.simulate import plan
        from medlora_lib.fl.sites import split_into_sites

        if not METHODS[config.method].federated:
            federated = ", ".join(n for n, m in METHODS.items() if m.federated)
            raise ConfigError(
                f"deploy: method {config.method!r} is not federated; choose one of "
                f"{federated} (run local / centralized with `medlora run`)"
            )
        if supernode_auth and not tls:
            raise ConfigError(
                "SuperNode authentication needs TLS (Flower refuses a SuperNode key on "
                "an insecure connection): add --tls (tls=True)"
            )
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.p,) = plan([config], use_cache=False, scratch=self.work)
        self.config = config
        self.sites = list(self.p.sites)
        self.site_dirs = {}
        data_root = self.work / "sites-data"
        existing = {
            s: data_root / s
            for s in self.sites
            if (data_root / s / "manifest.csv").exists()
        }
        if len(existing) == len(self.sites):
            self.site_dirs = existing  # a resumed deployment keeps its site folders
        else:
            self.site_dirs = split_into_sites(
                self.p.data_dir,
                data_root,
                config.fed.partition_by,
                self.sites,
                overwrite=True,
            )
        self.run_dir = self.work / "run"
        self.tls_files = None
        self.keys: dict[str, tuple[Path, Path]] = {}
        if tls:
            from medlora_lib.fl.security import make_test_pki

            self.tls_files = make_test_pki(self.work / "pki")
        self.supernode_auth = supernode_auth
        if supernode_auth:
            from medlora_lib.fl.security import make_supernode_keypair

            for s in self.sites:
                self.keys[s] = make_supernode_keypair(self.work / "keys", s)
        self.port = port
        self.record_messages = record_messages
        self.overrides = dict(overrides or {})
        self.link: LoopbackSuperLink | None = None
        self.nodes: dict[str, Any] = {}

    # ------------------------------------------------------------------ processes
    def start_superlink(self) -> LoopbackSuperLink:
        tls = None
        if self.tls_files is not None:
            tls = {
                "ca": self.tls_files["ca_cert"],
                "cert": self.tls_files["server_cert"],
                "key": self.tls_files["server_key"],
            }
        link = LoopbackSuperLink(
            self.work,
            simulation=False,
            tls=tls,
            supernode_auth=self.supernode_auth,
            port=self.port or (self.link.port if self.link else None),
            database=self.work / "superlink.db",
        )
        if self.link is not None:
            link.procs = [
                p
                for p in self.link.procs
                if p.poll() is None and p is not self.link.proc
            ]
        link.start()
        for _s, (_, pub) in self.keys.items():
            try:
                link.register(pub)
            except DeploymentError as exc:
                if "already" not in str(exc).lower():
                    raise
        self.link = link
        return link

    def start_supernode(self, site: str) -> Any:
        assert self.link is not None, "start the SuperLink first"
        state = self.work / "sites-state" / site
        node_config = {"data-path": str(self.site_dirs[site]), "state-dir": str(state)}
        key = self.keys.get(site, (None, None))[0]
        proc = start_supernode(
            self.link, self.work / "nodes", node_config, site, private_key=key
        )
        self.nodes[site] = proc
        return proc

    def run_config(self) -> Path:
        flat = to_run_config(
            self.config,
            RunOptions(dir=str(self.run_dir), record_messages=self.record_messages),
        )
        flat["fed.num-sites"] = len(self.sites)
        flat.update(self.overrides)
        return write_run_config(self.work / "run-config.toml", flat)

    def run(self, verbose: bool = False, timeout: float | None = None) -> int:
        """``flwr run`` the experiment against the running SuperLink (blocks)."""
        assert self.link is not None
        return flwr_run(
            self.link,
            self.run_config(),
            log=self.work / "flwr-run.log",
            verbose=verbose,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()

    def result(self) -> Any:
        from medlora_lib.fl.result import RunResult

        if not (self.run_dir / "results.json").exists():
            raise DeploymentError(
                f"the deployment ended without a result; everything is kept in "
                f"{self.work} (SuperLink log {self.work / 'superlink.log'}, SuperNode "
                f"logs {self.work / 'nodes'}, the finished rounds' checkpoints in "
                f"{self.run_dir / 'checkpoint'}). The log of `flwr run` ends:\n"
                + _tail(self.work / "flwr-run.log", 3000)
            )
        return RunResult.load(self.run_dir)


def deploy(
    config: ExperimentConfig,
    *,
    port: int | None = None,
    timeout: float = 3600.0,
    verbose: bool = True,
    work_dir: str | Path | None = None,
    record_messages: bool = False,
    tls: bool = False,
    supernode_auth: bool = False,
) -> Any:
    """Run one federated experiment on the Deployment Runtime on loopback.

    Args:
        config: a federated method's config.
        port: the SuperLink's port (default: a free one).
        timeout: seconds before the run is abandoned (its finished rounds are kept).
        verbose: stream the ServerApp's log.
        work_dir: where the site folders, logs, checkpoints and result go (default: a
            temporary folder, removed after a successful run, kept after a failure).
            Running again with the same folder resumes an interrupted run.
        record_messages: keep the message log in the result (privacy checks).
        tls: TLS between every process (a CA and certificates made for the run).
        supernode_auth: SuperNode authentication (a registered key pair per site).

    Returns:
        The :class:`~medlora_lib.fl.result.RunResult` (``provenance["runtime"]`` is
        ``"flower-deployment"``).

    Raises:
        ConfigError: non-federated method or a bad config.
        DataError: data that does not match its manifest or the config.
        DeploymentError: a Flower process failed or the time-out passed (the message
            names the kept work folder and quotes the log).
    """
    temporary = work_dir is None
    work = (
        Path(tempfile.mkdtemp(prefix="medlora-deploy-"))
        if temporary
        else Path(work_dir)
    )
    dep = Deployment(
        config,
        work,
        tls=tls,
        supernode_auth=supernode_auth,
        port=port,
        record_messages=record_messages,
    )
    t0 = time.perf_counter()
    ok = False
    try:
        dep.start_superlink()
        for s in dep.sites:
            dep.start_supernode(s)
        if verbose:
            print(
                f"deployment in {dep.work}: SuperLink {dep.link.address}, sites {', '.join(dep.sites)}"
            )
        dep.run(verbose=verbose, timeout=timeout)
        result = dep.result()
        ok = True
    except DeploymentError as exc:
        raise DeploymentError(
            f"{exc}\n(the work folder {dep.work} is kept; run again with work_dir={dep.work} to resume)"
        ) from None
    finally:
        dep.stop()
        if temporary and ok:
            shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(f"deployment finished in {time.perf_counter() - t0:.1f} s")
    return result
