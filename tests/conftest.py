"""Shared pytest set-up: headless plotting, quiet threads, a guard against empty runs."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_sessionfinish(session, exitstatus):  # noqa: D103
    # `make test` sets MEDLORA_MIN_TESTS: a run that collected fewer tests than that
    # (a broken import, a renamed folder) must fail instead of passing silently.
    minimum = int(os.environ.get("MEDLORA_MIN_TESTS", "0"))
    if minimum and session.testscollected < minimum:
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (
            f"only {session.testscollected} tests collected, expected at least "
            f"{minimum} (MEDLORA_MIN_TESTS): tests are missing or failed to import"
        )
        if reporter:
            reporter.write_line(msg, red=True)
