"""Test copies of the project's Flower App (a ClientApp that fails on purpose)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def failing_app(tmp: Path) -> Path:
    """The project's app with ``components.clientapp`` = the failing test ClientApp."""
    app = tmp / "failing_app"
    app.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace(
        'clientapp = "medlora_lib.fl.client_app:app"',
        'clientapp = "failing_client:app"',
    )
    text = re.sub(r"fab-include = \[.*\]", 'fab-include = ["failing_client.py"]', text)
    (app / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "tests" / "fixtures" / "failing_app" / "failing_client.py", app)
    return app
