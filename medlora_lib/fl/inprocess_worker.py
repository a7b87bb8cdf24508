"""A worker process of :func:`medlora_lib.fl.simulate.simulate` for in-process runs.

Chapters ``01_data_and_vendor_heterogeneity`` / ``02_single_site_baseline`` /
``03_fedavg_lora`` / ``07_beyond_the_paper``. ``python -m
medlora_lib.fl.inprocess_worker JOB`` reads a pickled list of jobs from ``JOB``: a
:class:`~medlora_lib.fl.simulate.Planned` experiment is run with
:func:`~medlora_lib.fl.simulate.run_inprocess` and its result saved to its run folder
(atomic files); a :class:`WorkerCall` (chapter 01's calibration runs, chapter 07's joins
of a new site) calls its function and pickles the return value to its ``out`` file
(atomic). On an error it pickles the exception to ``JOB.err`` (the caller raises it
again) and exits 1. A module of its own, started with ``subprocess``, so that it never
re-imports the caller's ``__main__`` (a script without an ``if __name__ ==
"__main__"`` guard stays safe, unlike a ``multiprocessing`` spawn).
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def resolve(function: str) -> Any:
    """The function ``"module:name"`` names."""
    module, name = function.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class WorkerCall:
    """``module:function`` called with ``args`` in a worker; its return value is pickled
    to ``out`` (the caller reads it back with :func:`read_call`)."""

    function: str
    args: tuple[Any, ...]
    out: Path

    def run(self) -> None:
        value = resolve(self.function)(*self.args)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_bytes(pickle.dumps(value))
        os.replace(tmp, self.out)


def read_call(call: WorkerCall) -> Any:
    """The value a worker wrote for ``call``."""
    return pickle.loads(call.out.read_bytes())


def main(argv: list[str] | None = None) -> int:
    job = Path((argv if argv is not None else sys.argv[1:])[0])
    try:
        # run as ``python -m``, this module is ``__main__``: the pickled jobs name the
        # importable one
        from medlora_lib.fl import inprocess_worker
        from medlora_lib.fl.simulate import run_inprocess

        for item in pickle.loads(job.read_bytes()):
            if isinstance(item, inprocess_worker.WorkerCall):
                item.run()
            else:
                run_inprocess(item).save(item.run_dir)
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
