"""The ``medlora`` command line.

- ``medlora synth OUT_DIR [--layout preprocessed|acdc|mnms] [--profile P] [--seed N]``
- ``medlora prepare {acdc,mnms,mnms2} RAW_DIR OUT_DIR [--profile P] [--merge]``
- ``medlora config [--profile P] [--set section.field=value ...]``
- ``medlora book [--profile P]``

Every user mistake ends with a one-paragraph ``error:`` message and exit status 2,
never a traceback. Explained in the book: ``book/real_data.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medlora_lib.config import PROFILES, get_config
from medlora_lib.errors import MedloraError

__all__ = ["main", "build_parser"]


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
        choices=["preprocessed", "acdc", "mnms"],
        help="ready-to-train arrays + manifest, or the official ACDC / M&Ms raw layout",
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

    b = sub.add_parser("book", help="execute the notebooks and build the site")
    _add_profile(b)
    b.add_argument("--out", type=Path, default=Path("_build"))
    return ap


def _cmd_synth(args: argparse.Namespace) -> None:
    from medlora_lib.data.synthetic import SynthConfig, make_synthetic

    overrides = {"seed": args.seed, "heterogeneity": args.heterogeneity}
    if args.scale is not None:
        overrides["scale"] = args.scale
    cfg = SynthConfig.for_profile(args.profile, **overrides)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medlora`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            _cmd_synth(args)
        elif args.command == "prepare":
            _cmd_prepare(args)
        elif args.command == "config":
            cfg = get_config(args.profile, overrides=args.set)
            print(json.dumps(cfg.to_dict(), indent=2))
        elif args.command == "book":
            from medlora_lib.bookrun import main as book_main

            return book_main(["--profile", args.profile, "--out", str(args.out)])
    except MedloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
