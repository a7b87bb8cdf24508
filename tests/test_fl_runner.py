"""``flwr run`` is pointed at a staged copy of the app's bundle files
(:func:`medlora_lib.fl.runner.staged_app`): Flower must build the very same FAB from it
as from the project folder itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from medlora_lib.fl.runner import project_dir, staged_app

PYPROJECT = """\
[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "medlora"
fab-include = {include}

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
num-rounds = 1
"""


def _tree(root: Path, include: str) -> Path:
    files = {
        "pyproject.toml": PYPROJECT.format(include=include),
        ".gitignore": ".venv/\n*.pyc\n/cache/\nbuild/\n",
        "README.md": "# tiny\n",
        "docs/guide.md": "guide\n",
        "docs/deep/notes.md": "notes\n",
        "tinyapp/__init__.py": "",
        "tinyapp/server.py": "app = None\n",
        "tinyapp/client.py": "app = None\n",
        "tinyapp/client.pyc": "compiled",
        ".venv/lib/site.py": "x = 1\n",
        ".venv/README.md": "an ignored README\n",
        "cache/README.md": "ignored too\n",
        "build/lib/tinyapp/server.py": "app = 1\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".git").mkdir()
    (root / ".git" / "README.md").write_text("git's own\n")
    return root


@pytest.mark.parametrize(
    "include",
    ['["README.md"]', '["README.md", "docs/**/*.md"]', '["**/*.md", "tinyapp/*.py"]'],
)
def test_the_staged_folder_builds_flowers_own_fab(tmp_path, include):
    root = _tree(tmp_path / "tinyapp", include)
    staged = staged_app(root, tmp_path / "staged")
    assert staged != root
    assert build_fab_from_disk(staged) == build_fab_from_disk(root)
    # and nothing from the ignored folders was copied
    assert not (staged / ".venv").exists() and not (staged / "cache").exists()
    # staging again replaces the folder (a file gone from the app is gone from it)
    (root / "README.md").write_text("# tiny, edited\n")
    again = staged_app(root, tmp_path / "staged")
    assert build_fab_from_disk(again) == build_fab_from_disk(root)


def test_without_fab_include_flower_walks_the_folder_itself(tmp_path):
    root = _tree(tmp_path / "tinyapp", "[]")
    assert staged_app(root, tmp_path / "staged") == root


@pytest.mark.slow
def test_the_project_bundle_is_the_one_flwr_run_dot_builds(tmp_path):
    """The real checkout (its .venv and run cache included, ~20 s of Flower's walk)."""
    root = project_dir()
    assert build_fab_from_disk(staged_app(root, tmp_path / "app")) == (
        build_fab_from_disk(root)
    )
