"""The Colab path, for real: a clean virtual environment, the install cell, a notebook.

Each notebook's first code cell (id ``colab-install``, written by
``python -m medlora_lib.bookrun --sync-links``) clones the repository and runs
``pip install -q CLONE_DIR`` when it runs in Colab. The slow test runs that cell's own
code in a fresh venv (with ``google.colab`` importable, and the clone pointed at a git
copy of this working tree instead of GitHub), then executes chapter 2 at ``smoke`` in
a kernel of that venv: a module the notebooks or the library import that
``pip install .`` does not install fails it. (The static check of every notebook's imports
against ``pyproject.toml`` is ``tests/test_colab_links.py``, through
``bookrun.notebook_extras``.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from medlora_lib import bookrun

ROOT = bookrun.REPO_ROOT
NOTEBOOK = ROOT / "notebooks" / "02_single_site_baseline.ipynb"
TORCH_SPEC = "torch==2.13.0"  # the local CPU wheel (Makefile's TORCH_SPEC)
KERNEL = "medlora-colab-test"
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def _install_cell(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    (cell,) = [c for c in cells if c.get("id") == bookrun.INSTALL_CELL_ID]
    assert cell["cell_type"] == "code"
    return "".join(cell["source"])


def _assigned(source: str, name: str) -> str:
    (value,) = re.findall(rf'(?m)^{name} = "([^"]*)"$', source)
    return value


def _replace_assignment(source: str, name: str, value: str) -> str:
    new, count = re.subn(rf'(?m)^{name} = "[^"]*"$', f"{name} = {value!r}", source)
    assert count == 1, f"{name} is assigned {count} times in the install cell"
    return new


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points at the worktree."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "JUPYTER_PATH"}
    }
    env.update(extra)
    return env


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600):
    result = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result


def _check(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


def _base_python() -> str:
    """The interpreter that made this environment (not a venv's own python)."""
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "executable" and Path(value.strip()).exists():
                return value.strip()
    return sys._base_executable


# ----------------------------------------------------------------- the real thing
def _executed_cells(path: Path) -> list[dict]:
    return [
        c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
    ]


def _git_copy(dest: Path, branch: str) -> Path:
    """A git repository holding this working tree (tracked + untracked, not ignored)
    on ``branch``: what ``git clone`` would fetch from GitHub after a push."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: {listed.stderr.strip()}")
    listed = listed.stdout
    files = [f for f in listed.split("\0") if f and (ROOT / f).is_file()]
    assert "pyproject.toml" in files and "medlora_lib/__init__.py" in files
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    env = _clean_env(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    for cmd in (
        ["git", "init", "-q", f"--initial-branch={branch}"],
        ["git", "add", "-A"],
        ["git", *GIT_ID, "commit", "-q", "-m", "working tree"],
    ):
        _check(_run(cmd, dest, env), " ".join(cmd))
    return dest


@pytest.mark.slow
def test_the_install_cell_installs_what_a_notebook_needs(tmp_path_factory):
    pytest.importorskip("papermill", reason="papermill drives the kernel ([book])")
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("colab")
    source = _install_cell(NOTEBOOK)
    branch = _assigned(source, "BRANCH")
    assert _assigned(source, "REPOSITORY") == bookrun.repository().url

    # 1. the repository, as a git copy of this working tree on the cell's branch
    repo = _git_copy(tmp / "repo", branch)
    clone_dir = tmp / "content" / "medlora"
    clone_dir.parent.mkdir()

    # 2. a clean venv (the base interpreter, its own pip): torch, then the kernel
    venv = tmp / "venv"
    env = _clean_env(PYTHONNOUSERSITE="1")
    _check(_run([_base_python(), "-m", "venv", venv], tmp, env), "python -m venv")
    python = venv / "bin" / "python"
    torch = _run([python, "-m", "pip", "install", "-q", TORCH_SPEC], tmp, env)
    if torch.returncode != 0:
        pytest.skip(
            f"`pip install {TORCH_SPEC}` failed (no package index here?): "
            f"{torch.stderr.strip()[-800:]}"
        )
    _check(_run([python, "-m", "pip", "install", "-q", "ipykernel"], tmp, env), "pip")
    kernel = ["-m", "ipykernel", "install", "--prefix", venv, "--name", KERNEL]
    _check(_run([python, *kernel], tmp, env), "ipykernel install")
    t_venv = time.perf_counter()

    # 3. the install cell's own code, "in Colab", against the local copy
    code = _replace_assignment(source, "REPOSITORY", repo.as_uri())
    code = _replace_assignment(code, "CLONE_DIR", str(clone_dir))
    colab = 'import sys, types\nsys.modules["google.colab"] = types.ModuleType("google.colab")\n'
    cell = tmp / "cell.py"
    cell.write_text(colab + code + "\n")
    out = _check(_run([python, cell], tmp, env), "the install cell")
    assert f"Colab: {repo.as_uri()} ({branch}) installed from {clone_dir}" in out
    assert (clone_dir / "notebooks" / NOTEBOOK.name).exists()
    head = _run(["git", "-C", clone_dir, "branch", "--show-current"], tmp, env)
    assert _check(head, "git branch").strip() == branch
    t_install = time.perf_counter()

    # the package (every module of it) imports from the venv, not from the worktree
    probe = textwrap.dedent(
        """\
        import importlib, json, pkgutil, sysconfig
        import medlora_lib
        names = [m.name for m in pkgutil.walk_packages(
            medlora_lib.__path__, "medlora_lib.")]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"file": medlora_lib.__file__, "modules": len(names),
                          "site": sysconfig.get_path("purelib")}))
        """
    )
    found = json.loads(_check(_run([python, "-c", probe], tmp, env), "import"))
    site = Path(found["site"]).resolve()
    where = Path(found["file"]).resolve()
    assert where.is_relative_to(site) or where.is_relative_to(clone_dir)
    assert not where.is_relative_to(ROOT), where
    assert found["modules"] > 10

    # 4. chapter 2 at smoke, in a kernel of the venv, from the clone's notebooks/
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(bookrun.notebook_parameters(NOTEBOOK, "smoke")))
    executed = tmp / f"executed_{NOTEBOOK.name}"
    run_env = _clean_env(
        JUPYTER_PATH=str(venv / "share" / "jupyter"),
        MEDLORA_CACHE=str(tmp / "cache"),
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        PYTHONNOUSERSITE="1",
    )
    notebooks = clone_dir / "notebooks"
    papermill = [sys.executable, "-m", "papermill", notebooks / NOTEBOOK.name, executed]
    papermill += ["-f", params, "-k", KERNEL, "--cwd", notebooks]
    papermill += ["--execution-timeout", "600", "--no-progress-bar"]
    _check(_run(papermill, tmp, run_env), f"papermill {NOTEBOOK.name}")
    t_notebook = time.perf_counter()

    outputs = [o for c in _executed_cells(executed) for o in c["outputs"]]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    # the kernel papermill started: the venv's python (the name is only found there)
    spec = "from jupyter_client.kernelspec import get_kernel_spec as g; "
    spec += f"s = g({KERNEL!r}); print(s.argv[0]); print(s.resource_dir)"
    argv0, spec_dir = _check(
        _run([sys.executable, "-c", spec], tmp, run_env), "spec"
    ).splitlines()
    assert argv0 == str(python)
    assert Path(spec_dir).is_relative_to(venv)
    print(
        f"venv {t_venv - t0:.0f} s, install cell {t_install - t_venv:.0f} s, "
        f"{NOTEBOOK.name} {t_notebook - t_install:.0f} s"
    )
