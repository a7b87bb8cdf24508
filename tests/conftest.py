"""Shared pytest set-up: headless plotting, quiet threads, a guard against empty runs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cinema_hf_home(tmp_path_factory):
    """An ``HF_HOME`` whose hub cache holds ``mathpluscode/CineMA``'s
    ``pretrained/cinema.safetensors`` as a formula checkpoint with CineMA's real keys
    and shapes (``tests/cinema_hub.py``; ~503 MB, written once per session)."""
    from tests.cinema_hub import formula_mae_state, write_hf_cache

    home = tmp_path_factory.mktemp("hf_home")
    write_hf_cache(home / "hub", formula_mae_state())
    return home


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
