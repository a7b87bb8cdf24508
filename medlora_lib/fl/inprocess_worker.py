"""A worker process of :func:`medlora_lib.fl.simulate.simulate` for in-process runs.

Chapters ``02_single_site_baseline`` / ``03_fedavg_lora``. ``python -m
medlora_lib.fl.inprocess_worker JOB`` reads a pickled list of
:class:`~medlora_lib.fl.simulate.Planned` experiments from ``JOB``, runs each one with
:func:`~medlora_lib.fl.simulate.run_inprocess` and saves its result to its run folder
(atomic files). On an error it pickles the exception to ``JOB.err`` (the caller raises
it again) and exits 1. A module of its own, started with ``subprocess``, so that it never
re-imports the caller's ``__main__`` (a script without an ``if __name__ ==
"__main__"`` guard stays safe, unlike a ``multiprocessing`` spawn).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    job = Path((argv if argv is not None else sys.argv[1:])[0])
    try:
        from medlora_lib.fl.simulate import run_inprocess

        for planned in pickle.loads(job.read_bytes()):
            run_inprocess(planned).save(planned.run_dir)
    except BaseException as exc:  # noqa: BLE001 - handed back to the caller
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        job.with_suffix(".err").write_bytes(payload)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
