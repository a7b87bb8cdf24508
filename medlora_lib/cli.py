"""The ``medlora`` command line.

- ``medlora synth OUT_DIR [--layout preprocessed|acdc|mnms|mnms2] [--profile P]
  [--seed N]``
- ``medlora prepare {acdc,mnms,mnms2} RAW_DIR OUT_DIR [--profile P] [--merge]``
- ``medlora config [--profile P] [--set section.field=value ...]``
- ``medlora book [--profile P]``
- ``medlora run --method M --profile P [--data DIR] [--out DIR] [--seed N] [--set k=v ...]``
- ``medlora deploy --method M --profile P [--data DIR] [--out DIR] [--work-dir DIR] [--tls] ...``
- ``medlora split-sites DATA_DIR OUT_DIR [--partition-by vendor|centre|vendor+acdc]``
- ``medlora export STATE_DIR OUT_DIR [--run KEY] [--which best|last]``

Every user mistake ends with a one-paragraph ``error:`` message and exit status 2,
never a traceback. Explained in the book: ``book/real_data.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from medlora_lib.config import PROFILES, get_config
from medlora_lib.errors import MedloraError

__all__ = ["main", "build_parser", "synth_config"]


def _add_profile(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument(
        "--profile",
        default=default,
        choices=PROFILES,
        help="named defaults (image size, spacing, client sizes); default %(default)s",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    ap = argparse.ArgumentParser(
        prog="medlora",
        description="Federated LoRA fine-tuning of a cardiac-MRI foundation model.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic multi-vendor cine data set")
    s.add_argument("out_dir", type=Path)
    s.add_argument(
        "--layout",
        default="preprocessed",
        choices=["preprocessed", "acdc", "mnms", "mnms2"],
        help="ready-to-train arrays + manifest, or the official ACDC / M&Ms / M&Ms-2 "
        "raw layout (mnms2: other subjects, for `prepare mnms2 --merge`)",
    )
    _add_profile(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heterogeneity", type=float, default=1.0)
    s.add_argument("--scale", type=float, default=None, help="override client sizes")
    s.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prepare", help="preprocess a real data set download")
    p.add_argument("dataset", choices=["acdc", "mnms", "mnms2"])
    p.add_argument("raw_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    _add_profile(p, default="paper")
    p.add_argument("--image-size", type=int, nargs=3, default=None)
    p.add_argument("--spacing", type=float, nargs=3, default=None)
    p.add_argument(
        "--crop",
        default=None,
        choices=["shift_inside", "lv_centred"],
        help="in-plane crop (config field data.crop; default: the profile's, "
        "shift_inside = CineMA's for paper)",
    )
    p.add_argument(
        "--intensity",
        default=None,
        choices=["per_frame", "joint"],
        help="clip + rescale per frame or jointly (config field data.intensity; "
        "default: the profile's, per_frame = CineMA's for paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument(
        "--merge", action="store_true", help="add to an existing prepared folder"
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--skip-unlisted",
        action="store_true",
        help="M&Ms / M&Ms-2: skip subjects missing from the CSV or from disk "
        "instead of failing",
    )

    c = sub.add_parser("config", help="print the resolved config of a profile")
    _add_profile(c)
    c.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")

    r = sub.add_parser(
        "run", help="run one experiment (federated methods in Flower's simulation)"
    )
    _add_run_args(r)
    r.add_argument(
        "--cache",
        action="store_true",
        help="reuse a cached result of the same config (default_cache_dir()/runs)",
    )

    d = sub.add_parser(
        "deploy",
        help="run one experiment on Flower's Deployment Runtime (SuperLink + one "
        "SuperNode per site on loopback, a thin launcher around `flwr run .`)",
    )
    _add_run_args(d)
    d.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the site folders, Flower homes, logs and checkpoints here (default: "
        "temporary, kept after a failure); the same folder again resumes the run",
    )
    d.add_argument(
        "--port", type=int, default=None, help="SuperLink port (default: free)"
    )
    d.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before giving up"
    )
    d.add_argument(
        "--tls",
        action="store_true",
        help="TLS between every process (a CA and certificates made for the run)",
    )
    d.add_argument(
        "--supernode-auth",
        action="store_true",
        help="SuperNode authentication (a registered ECDSA key pair per site)",
    )

    ss = sub.add_parser(
        "split-sites", help="write one prepared folder per site (one per SuperNode)"
    )
    ss.add_argument("data_dir", type=Path)
    ss.add_argument("out_dir", type=Path)
    ss.add_argument(
        "--partition-by", default="vendor", choices=["vendor", "centre", "vendor+acdc"]
    )
    ss.add_argument("--overwrite", action="store_true")

    e = sub.add_parser(
        "export",
        help="write the model a site uses (global + local adapter + head) as PEFT "
        "adapter folders",
    )
    e.add_argument("state_dir", type=Path, help="the SuperNode's state-dir")
    e.add_argument("out_dir", type=Path)
    e.add_argument("--run", default=None, help="run key (default: the newest run)")
    e.add_argument("--which", default="best", choices=["best", "last"])
    e.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("book", help="execute the notebooks and build the site")
    _add_profile(b)
    b.add_argument("--out", type=Path, default=Path("_build"))
    return ap


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from medlora_lib.adapters import METHODS

    p.add_argument(
        "--method",
        required=True,
        choices=list(METHODS),
        help="one of the book's methods (medlora_lib.adapters.METHODS)",
    )
    _add_profile(p)
    p.add_argument("--data", type=Path, default=None, help="prepared data folder")
    p.add_argument("--out", type=Path, default=None, help="where results go")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing result in --out"
    )


def _run_config(args: argparse.Namespace):
    overrides = list(args.set)
    if args.data is not None:
        overrides.append(f"data.data_dir={json.dumps(str(args.data.resolve()))}")
    top = {"method": args.method}
    if args.seed is not None:
        top["seed"] = args.seed
    return get_config(args.profile, overrides=overrides, **top)


def _cmd_run(args: argparse.Namespace, deploy: bool = False) -> None:
    from medlora_lib.config import config_hash
    from medlora_lib.errors import ConfigError

    cfg = _run_config(args)
    out = args.out or Path("runs") / f"{cfg.method}-{config_hash(cfg, 8)}"
    # refuse a bad --out before any training, not after
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the results")
    if (out / "results.json").exists() and not args.overwrite:
        raise ConfigError(
            f"--out {out} already holds a result; pass --overwrite to replace it or "
            "choose another folder"
        )
    t0 = time.perf_counter()
    if deploy:
        from medlora_lib.fl.deploy import deploy as run_deploy

        result = run_deploy(
            cfg,
            port=args.port,
            work_dir=args.work_dir,
            timeout=args.timeout,
            verbose=not args.quiet,
            tls=args.tls,
            supernode_auth=args.supernode_auth,
        )
    else:
        from medlora_lib.fl import simulate

        result = simulate(cfg, use_cache=args.cache, verbose=not args.quiet)
    result.save(out)
    sel = result.selected()
    cols = ["client", "round", "balanced_accuracy", "sensitivity", "specificity", "auc"]
    print(sel[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"{cfg.method}: wrote {out / 'results.json'} and {out / 'rounds.csv'} "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def synth_config(args: argparse.Namespace):
    """The :class:`~medlora_lib.data.synthetic.SynthConfig` a ``medlora synth`` command
    line writes with (so that a test can regenerate its reference subjects)."""
    from medlora_lib.data.synthetic import SynthConfig

    overrides = {"seed": args.seed, "heterogeneity": args.heterogeneity}
    if args.scale is not None:
        overrides["scale"] = args.scale
    return SynthConfig.for_profile(args.profile, **overrides)


def _cmd_synth(args: argparse.Namespace) -> None:
    from medlora_lib.data.synthetic import make_synthetic

    cfg = synth_config(args)
    t0 = time.perf_counter()
    out = make_synthetic(
        args.out_dir, cfg, layout=args.layout, overwrite=args.overwrite
    )
    print(
        f"wrote {args.layout} synthetic data to {out} ({time.perf_counter() - t0:.1f} s)"
    )


def _cmd_prepare(args: argparse.Namespace) -> None:
    cfg = get_config(args.profile)
    kwargs = dict(
        target_spacing=tuple(args.spacing or cfg.data.spacing),
        image_size=tuple(args.image_size or cfg.data.image_size),
        crop=args.crop or cfg.data.crop,
        intensity=args.intensity or cfg.data.intensity,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        merge=args.merge,
    )
    if args.dataset == "acdc":
        from medlora_lib.data.acdc import prepare_acdc as prepare
    elif args.dataset == "mnms":
        from medlora_lib.data.mnms import prepare_mnms as prepare

        kwargs["skip_unlisted"] = args.skip_unlisted
    else:
        from medlora_lib.data.mnms2 import prepare_mnms2 as prepare

        kwargs["skip_unlisted"] = args.skip_unlisted
    t0 = time.perf_counter()
    out = prepare(args.raw_dir, args.out_dir, **kwargs)
    print(f"prepared {args.dataset} into {out} ({time.perf_counter() - t0:.1f} s)")


def _show_data_warning(message, category, filename, lineno, file=None, line=None):
    """A :class:`~medlora_lib.errors.DataWarning` as one ``warning:`` line."""
    from medlora_lib.errors import DataWarning

    if issubclass(category, DataWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medlora`` console script."""
    args = build_parser().parse_args(argv)
    import signal

    warnings.showwarning = _show_data_warning

    def _terminate(signum, frame):  # SIGTERM: stop the Flower processes as Ctrl-C does
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "synth":
            _cmd_synth(args)
        elif args.command == "prepare":
            _cmd_prepare(args)
        elif args.command == "config":
            cfg = get_config(args.profile, overrides=args.set)
            print(json.dumps(cfg.to_dict(), indent=2))
        elif args.command == "run":
            _cmd_run(args)
        elif args.command == "deploy":
            _cmd_run(args, deploy=True)
        elif args.command == "split-sites":
            from medlora_lib.fl.sites import split_into_sites

            for site, path in split_into_sites(
                args.data_dir, args.out_dir, args.partition_by, overwrite=args.overwrite
            ).items():
                print(f"{site}: {path}")
        elif args.command == "export":
            from medlora_lib.fl.export import export_site_model

            path = export_site_model(
                args.state_dir,
                args.out_dir,
                run_key=args.run,
                which=args.which,
                overwrite=args.overwrite,
            )
            print(f"wrote {path}")
        elif args.command == "book":
            from medlora_lib.bookrun import main as book_main

            return book_main(["--profile", args.profile, "--out", str(args.out)])
    except MedloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: every Flower process was stopped; a federated run keeps its "
            "last checkpoint and resumes when started again with the same settings",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
