"""Colab that opens: one repository setting, every link derived from it.

``repository`` in ``_config.yml`` is the only place the project's URL is written by
hand; the Colab badges and table, clone commands, each notebook's install cell and
``CITATION.cff`` follow it (``medlora_lib.bookrun.sync_repository_links``), and each
notebook's install cell installs exactly what the notebook imports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import types
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

from medlora_lib import bookrun
from medlora_lib.errors import ConfigError
from medlora_lib.notebook import glue

ROOT = bookrun.REPO_ROOT
NOTEBOOKS = bookrun.list_notebooks()
URL = re.compile(r"https://(?:github\.com|colab\.research\.google\.com)/[^\s`'\")\]]+")
COLAB = re.compile(
    r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w.-]+)/"
    r"(notebooks/[\w.-]+\.ipynb)"
)
CLONE = re.compile(r"git clone[^\n`]*?(https://\S+?)(?:\.git)?(?=[\s`]|$)")


def _texts(root: Path) -> dict[str, str]:
    """The files the links live in, as text (notebooks: their cells' sources)."""
    texts = {
        str(p.relative_to(root)): p.read_text()
        for p in [*sorted((root / "book").glob("*.md")), root / "README.md"]
    }
    for nb in bookrun.list_notebooks(root):
        cells = json.loads(nb.read_text())["cells"]
        texts[str(nb.relative_to(root))] = "\n".join(
            "".join(c["source"]) for c in cells
        )
    texts["CITATION.cff"] = (root / "CITATION.cff").read_text()
    return texts


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("_config.yml", "README.md", "CITATION.cff", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    for folder in ("book", "notebooks"):
        shutil.copytree(ROOT / folder, root / folder)
    return root


def _set_repository(root: Path, url: str, branch: str) -> None:
    cfg = root / "_config.yml"
    text = re.sub(r"(?m)^  url: .*$", f"  url: {url}", cfg.read_text())
    cfg.write_text(re.sub(r"(?m)^  branch: .*$", f"  branch: {branch}", text))


def _install_cell(nb_path: Path) -> dict:
    cells = json.loads(nb_path.read_text())["cells"]
    return next(c for c in cells if c["cell_type"] == "code")


# ----------------------------------------------------------------- one setting
def test_the_setting_is_the_public_home_and_written_once_by_hand():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["repository"] == {
        "url": "https://github.com/medlora/medlora",
        "branch": "main",
        "path_to_book": "",
    }
    assert cfg["html"]["use_repository_button"] is True
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert bookrun.repository_url() == "https://github.com/medlora/medlora"
    # the one maintained source of the URL: code and settings other than _config.yml
    # never write it (the docs, notebooks and CITATION.cff are synced and checked)
    for path in [*ROOT.joinpath("medlora_lib").rglob("*.py"), ROOT / "pyproject.toml"]:
        assert "github.com/medlora/medlora" not in path.read_text(), path


def test_every_link_in_the_tree_follows_the_setting():
    assert bookrun.sync_repository_links(check=True) == []
    repo = bookrun.repository()
    colab_links = 0
    for where, text in _texts(ROOT).items():
        assert "OWNER" not in text, f"{where} still holds the OWNER placeholder"
        for owner_name, branch, path in COLAB.findall(text):
            assert (owner_name, branch) == ("medlora/medlora", "main"), where
            assert (ROOT / path).exists(), f"{where} opens {path}, which is missing"
            colab_links += 1
        for url in CLONE.findall(text):
            assert url == repo.url, f"{where}: git clone {url}"
    assert colab_links >= len(NOTEBOOKS)
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["repository-code"] == repo.url


def test_changing_the_setting_changes_every_link(tmp_path):
    root = _copy_tree(tmp_path)
    before = _texts(root)
    _set_repository(root, "https://github.com/a-fork/medlora-fork", "dev")
    with pytest.raises(ConfigError, match="--sync-links"):
        bookrun.check_repository_links(root)
    changed = bookrun.sync_repository_links(root=root)
    assert {line.split(":")[0] for line in changed} >= {
        "book/gpu_colab.md",
        "README.md",
        "CITATION.cff",
        *(f"notebooks/{nb.name}" for nb in NOTEBOOKS),
    }
    assert bookrun.sync_repository_links(check=True, root=root) == []
    after = _texts(root)
    for where, text in after.items():
        assert "medlora/medlora" not in text, f"{where} kept the old repository"
        old_urls = URL.findall(before[where])
        new_urls = URL.findall(text)
        assert len(old_urls) == len(new_urls), where  # nothing lost, nothing added
        for owner_name, branch, _ in COLAB.findall(text):
            assert (owner_name, branch) == ("a-fork/medlora-fork", "dev")
    for nb in bookrun.list_notebooks(root):
        src = "".join(_install_cell(nb)["source"])
        assert 'REPOSITORY = "https://github.com/a-fork/medlora-fork"' in src
        assert 'BRANCH = "dev"' in src
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    assert cff["repository-code"] == "https://github.com/a-fork/medlora-fork"


def test_a_bad_setting_or_a_dead_link_is_refused_with_the_fix(tmp_path):
    root = _copy_tree(tmp_path)
    _set_repository(root, "https://github.com/a-fork/medlora.git", "main")
    with pytest.raises(ConfigError, match=r"_config.yml: repository.url .*no '.git'"):
        bookrun.sync_repository_links(check=True, root=root)
    _set_repository(root, "https://github.com/a-fork/medlora", "main")
    readme = root / "README.md"
    dead = (
        "https://colab.research.google.com/github/x/y/blob/main/notebooks/99_no.ipynb"
    )
    readme.write_text(readme.read_text() + f"\n[open]({dead})\n")
    with pytest.raises(ConfigError, match=r"README.md: .*99_no.ipynb.*does not exist"):
        bookrun.sync_repository_links(root=root)
    assert dead in readme.read_text()  # nothing written when something is wrong


def test_rewrites_keep_the_shape_of_each_command():
    repo = bookrun.Repository("https://github.com/new/repo", "dev")
    text = (
        "git clone --depth 1 https://github.com/old/medlora.git /content/medlora\n"
        "git clone https://github.com/old/medlora && cd medlora\n"
        "pip install git+https://github.com/old/medlora.git@v0.1\n"
        "see https://github.com/mathpluscode/CineMA (not ours)\n"
    )
    new, what = bookrun._rewrite_links(text, repo, ROOT, "x.md", [])
    assert new == (
        "git clone --depth 1 https://github.com/new/repo.git /content/medlora\n"
        "git clone https://github.com/new/repo && cd medlora\n"
        "pip install git+https://github.com/new/repo.git@v0.1\n"
        "see https://github.com/mathpluscode/CineMA (not ours)\n"
    )
    assert what == ["clone URL", "clone URL", "git+ URL"]


def test_the_build_refuses_links_out_of_sync(tmp_path, monkeypatch):
    root = _copy_tree(tmp_path)
    _set_repository(root, "https://github.com/a-fork/medlora", "main")
    monkeypatch.setattr(bookrun, "REPO_ROOT", root)
    with pytest.raises(ConfigError) as err:
        bookrun.build_site(tmp_path / "site")
    message = str(err.value)
    assert "book/gpu_colab.md" in message and "notebooks/00_" in message
    assert bookrun.SYNC_COMMAND in message and "_config.yml" in message


# ---------------------------------------------------------------- the Colab table
def test_the_colab_table_has_one_row_per_notebook():
    text = (ROOT / "book" / "gpu_colab.md").read_text()
    table = text.split(bookrun.COLAB_TABLE_START)[1].split(bookrun.COLAB_TABLE_END)[0]
    rows = [line for line in table.strip().splitlines()[2:]]
    assert len(rows) == len(NOTEBOOKS)
    for row, nb in zip(rows, NOTEBOOKS, strict=True):
        title = bookrun.notebook_title(nb)
        assert row.startswith(f"| {title} |")
        assert bookrun.repository().colab_url(f"notebooks/{nb.name}") in row
    assert bookrun.notebook_title(NOTEBOOKS[0]).startswith("0. The foundation model")
    assert "OWNER stands for" not in text and bookrun.SYNC_COMMAND in text


def test_the_site_is_laid_out_like_the_repository(tmp_path):
    # The launch button opens <path_to_book><page>.ipynb of the repository: the staged
    # site must keep every notebook at its repository path (notebooks/NN_*.ipynb).
    executed = tmp_path / "executed" / "notebooks"
    executed.mkdir(parents=True)
    for nb in NOTEBOOKS:
        shutil.copy2(nb, executed / nb.name)
    site = bookrun.assemble_site(tmp_path / "executed", tmp_path / "site")
    staged = sorted(p.relative_to(site) for p in site.glob("notebooks/*.ipynb"))
    assert staged == [nb.relative_to(ROOT) for nb in NOTEBOOKS]
    from jupyter_book.config import yaml_to_sphinx

    sphinx_config = yaml_to_sphinx(yaml.safe_load((site / "_config.yml").read_text()))
    theme = sphinx_config[0]["html_theme_options"]
    assert theme["path_to_docs"] == ""
    assert theme["repository_url"] == bookrun.repository_url()
    assert theme["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


# ---------------------------------------------------------------- the install cell
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def _allowed(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {_norm(project["name"]), "ipython"}  # the package; the kernel itself
    allowed |= {_requirement(r) for r in project["dependencies"]}
    for extra in extras:
        allowed |= {_requirement(r) for r in project["optional-dependencies"][extra]}
    return allowed


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_the_first_code_cell_installs_what_the_notebook_imports(nb_path):
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    install, setup_cell = code[0], code[1]
    assert install["id"] == bookrun.INSTALL_CELL_ID
    assert "setup(" in "".join(setup_cell["source"])
    src = "".join(install["source"])
    assert src == bookrun.install_cell_source(bookrun.repository(), [])
    # what it installs: the package, with the extras named in brackets (none here)
    target = re.search(r'"-q", (CLONE_DIR|f"\{CLONE_DIR\}\[([\w,]+)\]")\]', src)
    extras = target.group(2).split(",") if target.group(2) else []
    # what the notebook imports, mapped to distributions
    owners = packages_distributions()
    allowed = _allowed(extras)
    tops = {m.split(".")[0] for m in bookrun.notebook_imports(nb)}
    assert "myst_nb" not in tops, "use medlora_lib.notebook.glue (runs without it)"
    for top in sorted(tops - set(sys.stdlib_module_names)):
        dists = {_norm(d) for d in owners.get(top, [])}
        assert dists & allowed, f"{nb_path.name} imports {top} ({dists}): not installed"
    assert bookrun.notebook_extras(nb, nb_path.name) == extras
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[2], "the parameters cell moved"


def test_an_import_that_needs_an_extra_or_is_undeclared(tmp_path):
    nb = {"cells": [{"cell_type": "code", "id": "x", "source": ["import papermill\n"]}]}
    assert bookrun.notebook_extras(nb, "nb.ipynb") == ["book"]
    assert "/content/medlora[book]" in bookrun.install_cell_source(
        bookrun.repository(), ["book"]
    ).replace('f"{CLONE_DIR}', '"/content/medlora')
    nb["cells"][0]["source"] = ["%matplotlib inline\n", "import papermill as pm\n"]
    assert bookrun.notebook_extras(nb, "nb.ipynb") == ["book"]
    # installed here (through jupyter-book), but not declared: say so, do not guess
    nb["cells"][0]["source"] = ["from myst_nb import glue\n"]
    with pytest.raises(ConfigError, match=r"nb.ipynb imports `myst_nb`.*pyproject"):
        bookrun.notebook_extras(nb, "nb.ipynb")


def _run_install_cell(monkeypatch, in_colab: bool) -> tuple[list, list]:
    import importlib.util
    import os

    calls, chdirs = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", chdirs.append)
    monkeypatch.setattr(os.path, "isdir", lambda path: False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "medlora_lib" else real_find_spec(name, *a),
    )
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec("".join(_install_cell(NOTEBOOKS[0])["source"]), {})
    return calls, chdirs


def test_the_install_cell_does_nothing_outside_colab(monkeypatch):
    assert _run_install_cell(monkeypatch, in_colab=False) == ([], [])


def test_the_install_cell_clones_and_installs_in_colab(monkeypatch, capsys):
    calls, chdirs = _run_install_cell(monkeypatch, in_colab=True)
    clone, pip = calls
    assert clone == [
        "git",
        "clone",
        "--depth",
        "1",
        "--branch",
        "main",
        "https://github.com/medlora/medlora",
        "/content/medlora",
    ]
    assert pip == [sys.executable, "-m", "pip", "install", "-q", "/content/medlora"]
    assert chdirs == ["/content/medlora/notebooks"]
    assert "Colab: https://github.com/medlora/medlora (main)" in capsys.readouterr().out


# ---------------------------------------------------------------- glue
def test_glue_runs_without_myst_nb_and_shows_the_value(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # `import myst_nb` fails
    glue("upper_bound", 0.875, display=False)
    assert capsys.readouterr().out == "upper_bound:\n0.875\n"


def test_glue_is_myst_nb_glue_when_installed(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, value, display=True: seen.append((name, value, display))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    glue("md_ba", 0.7, display=False)
    assert seen == [("md_ba", 0.7, False)] and capsys.readouterr().out == ""


# ---------------------------------------------------------------- licence, citation
def test_licence_and_citation():
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert cff["title"] == "medlora: federated LoRA for a cardiac-MRI foundation model"
    assert cff["version"] == project["version"]
    (paper,) = cff["references"]
    assert paper["title"].startswith("Med-DualLoRA: Local Adaptation")
    assert [a["family-names"] for a in paper["authors"]] == [
        "Perramon-Llussà",
        "Jiménez-Sánchez",
        "Skorupko",
        "Avgoustidis",
        "Martín-Isla",
        "Lekadir",
        "Gkontra",
    ]
    assert all(
        set(a) == {"family-names"} for a in paper["authors"]
    )  # no invented names
    assert paper["year"] == 2026 and "2603.10967" in paper["url"]
