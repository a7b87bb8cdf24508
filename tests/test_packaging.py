"""The project's install metadata: pins that matter and environment.yml == pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(req: str) -> str:
    req = req.strip().lower().replace("_", "-")
    return re.sub(r"\s+", "", req)


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    return {_norm(r) for r in reqs}


def _environment_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {_norm(r) for r in pip}


def test_environment_yml_matches_pyproject():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert py == env, (
        f"only in pyproject: {py - env}; only in environment.yml: {env - py}"
    )


def test_known_good_pins():
    reqs = _pyproject_requirements()
    assert "flwr[simulation]==1.42.0" in reqs
    jb = next(r for r in reqs if r.startswith("jupyter-book"))
    assert "<2" in jb, "jupyter-book v2 downloads its theme and fails offline"
    torch = next(r for r in reqs if r.startswith("torch"))
    assert "==" not in torch, "GPU users must be able to keep their own torch build"
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_ci_calls_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make book" in readme


def test_no_flower_federations_table_in_pyproject():
    # `flwr run` rewrites pyproject.toml when it holds [tool.flwr.federations].
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "federations" not in meta.get("tool", {}).get("flwr", {})


def test_notebooks_are_stored_without_outputs():
    import nbformat

    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{nb_path.name} has stored outputs"
                assert cell.execution_count is None, f"{nb_path.name} has counts"
        tagged = [
            c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])
        ]
        assert len(tagged) == 1, f"{nb_path.name} needs exactly one `parameters` cell"
