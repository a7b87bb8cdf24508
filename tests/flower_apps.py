"""Test copies of the project's Flower App (a ClientApp that fails on purpose)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_message(shared, rnd: int = 1, node: int = 1, **extra):
    """A train message exactly as the project's strategy builds it (its
    ``round_config``), plus ``extra`` config keys (e.g. a DP wrapper's
    ``clipping_norm``): for tests of the site side."""
    from flwr.app import ArrayRecord, Message, RecordDict

    from medlora_lib.fl.strategies import MedloraFedAvg

    config = MedloraFedAvg(lr=1e-3, run_key="k").round_config(rnd, False)
    for k, v in extra.items():
        config[k] = v
    return Message(
        RecordDict({"arrays": ArrayRecord(shared), "config": config}),
        dst_node_id=node,
        message_type="train",
    )


def _app_with_client(tmp: Path, folder: str, module: str) -> Path:
    """The project's app with ``components.clientapp`` = ``tests/fixtures/<folder>/
    <module>.py:app``."""
    app = tmp / folder
    app.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace(
        'clientapp = "medlora_lib.fl.client_app:app"',
        f'clientapp = "{module}:app"',
    )
    text = re.sub(r"fab-include = \[.*\]", f'fab-include = ["{module}.py"]', text)
    (app / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "tests" / "fixtures" / folder / f"{module}.py", app)
    return app


def failing_app(tmp: Path) -> Path:
    """The project's app with ``components.clientapp`` = the failing test ClientApp."""
    return _app_with_client(tmp, "failing_app", "failing_client")


def probe_app(tmp: Path) -> Path:
    """The project's app with a ClientApp that logs, after every message, what its
    process holds (``tests/fixtures/probe_app``; log file: ``MEDLORA_PROBE_LOG``)."""
    return _app_with_client(tmp, "probe_app", "probe_client")


def check_message_keys(result) -> None:
    """Every message of ``result.messages`` holds only what the issue allows: the shared
    tensors, the round's config (:data:`ROUND_CONFIG_KEYS`) and scalar metrics."""
    from medlora_lib.adapters import get_shared_state
    from medlora_lib.fl.strategies import ROUND_CONFIG_KEYS, TEST_ABOVE_KEYS
    from medlora_lib.fl.task import build_adapted_model

    shared = set(get_shared_state(build_adapted_model(result.config)))
    assert result.messages
    seen = set()
    for m in result.messages:
        assert "error" not in m, m
        recs = m["records"]
        kinds = {name: rec["type"] for name, rec in recs.items()}
        key = (m["direction"], m["phase"])
        seen.add(key)
        if key == ("down", "query"):
            assert kinds == {"config": "ConfigRecord"}
        elif key == ("up", "query"):
            assert kinds == {"site": "ConfigRecord", "metrics": "MetricRecord"}
            assert recs["site"]["keys"] == ["site"]
            assert recs["metrics"]["keys"] == ["num-examples"]
        elif m["direction"] == "down":  # train and evaluate instructions
            assert kinds == {"arrays": "ArrayRecord", "config": "ConfigRecord"}
            keys = tuple(recs["config"]["keys"])
            n = len(ROUND_CONFIG_KEYS)
            assert keys[:n] == ROUND_CONFIG_KEYS
            # a site's own best validation values so far (train.test_every_round)
            assert set(keys[n:]) <= set(TEST_ABOVE_KEYS.values())
        elif key == ("up", "train"):
            assert kinds == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}
            keys = set(recs["metrics"]["keys"])
            fixed = {"num-examples", "train-loss", "train-seconds", "state-seconds"}
            assert fixed <= keys
            assert all(k.startswith("prev-eval/") for k in keys - fixed)
        else:
            assert key == ("up", "evaluate") and kinds == {"metrics": "MetricRecord"}
        for rec in recs.values():
            if rec["type"] == "ArrayRecord":
                assert set(rec["keys"]) == shared
            else:  # scalars and short strings only: no experiment JSON, no paths
                assert set(rec["value_types"]) <= {"int", "float", "str", "bool"}
    assert seen == {
        (d, p) for d in ("down", "up") for p in ("query", "train", "evaluate")
    }
