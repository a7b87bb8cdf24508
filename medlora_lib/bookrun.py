"""Execute the notebooks with papermill, then build the site with jupyter-book (v1).

The book is executed exactly once: papermill runs every notebook (``cpu`` profile by
default, or ``smoke`` with the values of ``notebooks/smoke_parameters.yaml``), the executed
copies are assembled with the prose chapters into a staging folder, and jupyter-book
renders that folder with execution turned off.

Usage: ``python -m medlora_lib.bookrun --profile cpu --out _build`` (``make book``).
Explained in the book: ``book/reproducibility.md``.

The repository's public URL is written once, as ``repository.url`` (and
``repository.branch``) in ``_config.yml``; every Colab badge, ``git clone`` and
``pip install git+`` command, each notebook's Colab install cell and ``CITATION.cff``
are derived from it by :func:`sync_repository_links`
(``python -m medlora_lib.bookrun --sync-links``), and the build refuses to start while
they are out of sync. Explained in ``book/gpu_colab.md``, section 3.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medlora_lib.errors import ConfigError

__all__ = [
    "REPO_ROOT",
    "list_notebooks",
    "PROFILE_PARAMETERS",
    "parameter_names",
    "notebook_parameters",
    "cell_timeout",
    "execute_notebooks",
    "assemble_site",
    "build_site",
    "check_site",
    "Repository",
    "repository",
    "repository_url",
    "notebook_title",
    "notebook_imports",
    "notebook_extras",
    "install_cell_source",
    "colab_table",
    "sync_repository_links",
    "check_repository_links",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_PARAMETERS = REPO_ROOT / "notebooks" / "smoke_parameters.yaml"

# Warnings from Sphinx / jupyter-book that mean the site is broken.
_FATAL_WARNINGS = re.compile(
    r"(WARNING|ERROR).*("
    r"not found|nonexisting document|undefined label|unknown document|"
    r"image file not readable|could not be read|failed to|Unknown target|"
    r"toctree contains|citation not found|Could not lex|Duplicate|"
    r"could not find bibtex key|missing author|Lexing literal_block"
    r")",
    re.IGNORECASE,
)


def list_notebooks(root: Path = REPO_ROOT) -> list[Path]:
    """The book's notebooks in reading order (``notebooks/NN_*.ipynb``)."""
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


#: Notebook parameters that are values of the profile: ``name -> (section, field)``.
PROFILE_PARAMETERS: dict[str, tuple[str, str]] = {
    "num_rounds": ("fed", "num_rounds"),
    "lora_rank": ("adapter", "lora_rank"),
    "lora_alpha": ("adapter", "lora_alpha"),
}


def _parameters_cell(notebook: Path) -> list:
    """The statements of ``notebook``'s cell tagged ``parameters`` ([] if none)."""
    import ast

    nb = json.loads(Path(notebook).read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return ast.parse("".join(cell["source"])).body
    return []


def parameter_names(notebook: Path) -> list[str]:
    """The names assigned in ``notebook``'s cell tagged ``parameters``."""
    import ast

    return [
        t.id
        for node in _parameters_cell(notebook)
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    ]


def parameter_defaults(notebook: Path) -> dict[str, Any]:
    """The values ``notebook``'s ``parameters`` cell assigns (literals: the ``cpu``
    profile's run; tests and ``benchmarks/bench_book_floor.py`` read them here).

    Raises:
        ValueError: a value that is not a literal.
    """
    import ast

    return {
        t.id: ast.literal_eval(node.value)
        for node in _parameters_cell(notebook)
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def notebook_parameters(notebook: Path, profile: str) -> dict[str, Any]:
    """Papermill parameters for ``notebook`` under ``profile``.

    ``cpu`` runs with the defaults stored in the notebook's ``parameters`` cell (the
    ``cpu`` profile's values, a test keeps them equal). Any other profile passes
    ``profile`` and, for every parameter that is a value of the profile
    (:data:`PROFILE_PARAMETERS`: ``num_rounds``, ``lora_rank``, ``lora_alpha``), the
    profile's value, so that ``--profile paper`` runs the paper's budget; ``smoke``
    then adds ``common`` and the notebook's own section of
    ``notebooks/smoke_parameters.yaml``.
    """
    if profile == "cpu":
        return {}
    from medlora_lib.config import get_config

    cfg = get_config(profile)
    params: dict[str, Any] = {"profile": profile}
    for name in parameter_names(notebook):
        if name in PROFILE_PARAMETERS:
            section, field = PROFILE_PARAMETERS[name]
            params[name] = getattr(getattr(cfg, section), field)
    if profile == "smoke":
        spec = yaml.safe_load(SMOKE_PARAMETERS.read_text()) or {}
        params.update(spec.get("common", {}) or {})
        params.update(spec.get(notebook.stem, {}) or {})
    return params


def cell_timeout(profile: str) -> int | None:
    """Papermill's per-cell time-out: none for ``paper`` (a cell trains for hours on a
    GPU), an hour otherwise (a hung cell fails the build instead of blocking it)."""
    return None if profile == "paper" else 3600


def execute_notebooks(
    out_dir: Path,
    profile: str = "cpu",
    only: list[str] | None = None,
    timeout: int | None | str = "profile",
) -> dict[str, float]:
    """Execute each notebook with papermill into ``out_dir/notebooks``.

    ``timeout`` is the per-cell limit in seconds (``"profile"``: :func:`cell_timeout`).

    Returns:
        Seconds per notebook (also written to ``out_dir/timings.json``).
    """
    nb_out = out_dir / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    if timeout == "profile":
        timeout = cell_timeout(profile)
    # The kernel inherits this environment: a non-interactive MPLBACKEND (Agg, set for
    # headless tests) would stop plt.show() from embedding figures in the notebooks.
    saved_backend = os.environ.pop("MPLBACKEND", None)
    try:
        return _execute(nb_out, out_dir, profile, only, timeout)
    finally:
        if saved_backend is not None:
            os.environ["MPLBACKEND"] = saved_backend


def _execute(
    nb_out: Path,
    out_dir: Path,
    profile: str,
    only: list[str] | None,
    timeout: int | None,
) -> dict[str, float]:
    import papermill as pm

    timings: dict[str, float] = {}
    env_cache = os.environ.setdefault(
        "MEDLORA_CACHE", str(REPO_ROOT / ".cache" / "medlora")
    )
    for nb in list_notebooks():
        if only and not any(key in nb.stem for key in only):
            continue
        params = notebook_parameters(nb, profile)
        print(f"[book] executing {nb.name} (profile={profile}) ...", flush=True)
        t0 = time.perf_counter()
        pm.execute_notebook(
            str(nb),
            str(nb_out / nb.name),
            parameters=params,
            cwd=str(nb.parent),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=timeout,
            report_mode=False,
        )
        timings[nb.stem] = round(time.perf_counter() - t0, 1)
        print(f"[book] {nb.name}: {timings[nb.stem]:.1f} s", flush=True)
    (out_dir / "timings.json").write_text(
        json.dumps(
            {"profile": profile, "cache": env_cache, "seconds": timings}, indent=2
        )
    )
    return timings


def assemble_site(executed_dir: Path, site_src: Path) -> Path:
    """Copy the book sources and the executed notebooks into ``site_src``."""
    if site_src.exists():
        shutil.rmtree(site_src)
    site_src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "references.bib", "README.md"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, site_src / name)
    shutil.copytree(REPO_ROOT / "book", site_src / "book")
    shutil.copytree(executed_dir / "notebooks", site_src / "notebooks")
    timings = executed_dir / "timings.json"
    if timings.exists():
        shutil.copy2(timings, site_src / "book" / "timings.json")
    (site_src / "book" / "timings_table.md").write_text(timings_table(timings))
    return site_src


def timings_table(timings_json: Path) -> str:
    """The Markdown table of this build's notebook timings (included by the appendix).

    Written into the site sources at every build from ``timings.json``, so the
    reproducibility appendix shows what *this* build measured, on *this* machine.
    """
    import platform

    if not timings_json.exists():
        return "*No timings recorded: the notebooks were not executed by this build.*\n"
    data = json.loads(timings_json.read_text())
    secs = data.get("seconds", {})
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the table must not break the build
        pass
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"
    built = time.strftime("%Y-%m-%d", time.gmtime(timings_json.stat().st_mtime))
    lines = [
        f"Profile `{data.get('profile', '?')}`, built {built} on {machine} "
        f"(Python {platform.python_version()}).",
        "",
        "| notebook | seconds |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {sec:.0f} |" for name, sec in secs.items()]
    lines.append(f"| **all notebooks** | **{sum(secs.values()):.0f}** |")
    return "\n".join(lines) + "\n"


def build_site(site_src: Path, strict: bool = True) -> Path:
    """Run ``jupyter-book build`` on ``site_src``; fail on warnings that matter.

    Returns:
        The folder of the rendered HTML.

    Raises:
        ConfigError: the repository's Colab links, clone commands or install cells
            disagree with ``repository`` in ``_config.yml``
            (:func:`check_repository_links`).
        RuntimeError: the build failed, or (``strict``) it printed a warning about a
            missing file, a broken cross-reference or an unreadable image.
    """
    check_repository_links(REPO_ROOT)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(site_src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (site_src / "build.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{log[-4000:]}")
    fatal = [line for line in log.splitlines() if _FATAL_WARNINGS.search(line)]
    if strict and fatal:
        raise RuntimeError(
            "jupyter-book build printed warnings that break the site:\n"
            + "\n".join(fatal[:30])
        )
    return site_src / "_build" / "html"


def check_site(html_dir: Path) -> list[str]:
    """Problems in the rendered site: broken internal links, missing images.

    Returns:
        A list of human-readable problems (empty when the site is sound).
    """
    problems: list[str] = []
    link_re = re.compile(r'(?:href|src)="([^"#?]+)[^"]*"')
    for page in html_dir.rglob("*.html"):
        if "_static" in page.relative_to(html_dir).parts:
            continue  # theme templates, not pages
        text = page.read_text(errors="replace")
        for target in link_re.findall(text):
            if (
                re.match(r"^[a-z]+:", target)
                or target.startswith("//")
                or "{{" in target
            ):
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.exists():
                problems.append(f"{page.relative_to(html_dir)} -> {target}")
    return problems


# ---------------------------------------------------------------- repository links
CONFIG_FILE = "_config.yml"
CITATION_FILE = "CITATION.cff"
COLAB_PAGE = "book/gpu_colab.md"
SYNC_COMMAND = "python -m medlora_lib.bookrun --sync-links"
COLAB_TABLE_START = "<!-- colab-table:start -->"
COLAB_TABLE_END = "<!-- colab-table:end -->"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
#: ``id`` of the first code cell of every notebook (written by :func:`install_cell_source`).
INSTALL_CELL_ID = "colab-install"
COLAB_CLONE_DIR = "/content/medlora"
#: Distributions every notebook has without installing them: the kernel it runs in.
KERNEL_DISTRIBUTIONS = frozenset({"ipython", "ipykernel"})
#: Modules of the Colab runtime itself (``from google.colab import drive``).
COLAB_MODULES = ("google.colab",)

_GITHUB_URL = re.compile(r"^https://github\.com/([\w.-]+)/([\w.-]+?)$")
_COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/"
    r"(?P<path>notebooks/[\w.-]+\.ipynb)"
)
_URL_END = r"(?=[\s`'\")\]]|$)"
# `git clone [--flag [value]]... URL[.git]`: the flags' values are never URLs.
_GIT_CLONE = re.compile(
    r"(?P<pre>git clone(?:\s+--?[\w-]+(?:[ =](?!https?://)[^\s`'\"]+)?)*\s+)"
    r"(?P<url>https?://[^\s`'\")\]]+?)(?P<git>\.git)?" + _URL_END
)
_PIP_GIT = re.compile(
    r"(?P<pre>git\+)(?P<url>https?://[^\s`'\")\]@#]+?)(?P<git>\.git)?"
    r"(?=[\s`'\")\]@#]|$)"
)


@dataclass(frozen=True)
class Repository:
    """The project's public repository, as ``repository`` in ``_config.yml`` says."""

    url: str  # https://github.com/<owner>/<name>, no trailing ".git" or "/"
    branch: str

    @property
    def owner_and_name(self) -> str:
        """``<owner>/<name>``, as Colab's ``/github/`` links write it."""
        return self.url.removeprefix("https://github.com/")

    def colab_url(self, notebook: str) -> str:
        """Colab's link to ``notebook`` (a path in the repository, ``notebooks/…``)."""
        return (
            "https://colab.research.google.com/github/"
            f"{self.owner_and_name}/blob/{self.branch}/{notebook}"
        )


def repository(root: Path = REPO_ROOT) -> Repository:
    """``repository.url`` and ``repository.branch`` of ``root/_config.yml``.

    Raises:
        ConfigError: the file, the section or a field is missing, or the URL is not
            ``https://github.com/<owner>/<name>`` (Colab opens notebooks from GitHub).
    """
    path = root / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found: the book's settings live there")
    section = (yaml.safe_load(path.read_text()) or {}).get("repository") or {}
    url = str(section.get("url", "")).strip()
    branch = str(section.get("branch", "")).strip()
    if not _GITHUB_URL.match(url) or url.endswith(".git"):
        raise ConfigError(
            f"{CONFIG_FILE}: repository.url is {url!r}; expected the repository's "
            "GitHub address, https://github.com/<owner>/<name> (no '.git', no "
            "trailing '/'): Colab opens the notebooks from GitHub"
        )
    if not branch or any(c.isspace() for c in branch):
        raise ConfigError(
            f"{CONFIG_FILE}: repository.branch is {branch!r}; expected the branch "
            "the Colab links open, e.g. `branch: main`"
        )
    return Repository(url=url, branch=branch)


def repository_url(root: Path = REPO_ROOT) -> str:
    """The project's public URL, ``repository.url`` in ``_config.yml``."""
    return repository(root).url


def notebook_title(notebook: Path) -> str:
    """The text of the notebook's first Markdown heading (its title on the site)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return notebook.stem


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def notebook_imports(nb: dict) -> set[str]:
    """Dotted names of the modules the notebook's code imports (its install cell aside).

    Lines of IPython magics (``%…``, ``!…``) are skipped; relative imports are ignored.
    """
    import ast

    names: set[str] = set()
    for cell in _code_cells(nb):
        if cell.get("id") == INSTALL_CELL_ID:
            continue
        lines = "".join(cell["source"]).splitlines()
        code = "\n".join(
            "" if line.lstrip().startswith(("%", "!")) else line for line in lines
        )
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return names


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _project(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


@functools.cache
def _module_owners() -> dict[str, list[str]]:
    # scans every installed distribution's metadata: once per process
    from importlib.metadata import packages_distributions

    return packages_distributions()


def notebook_extras(nb: dict, name: str, root: Path = REPO_ROOT) -> list[str]:
    """The package extras (``pyproject.toml``) that the notebook's imports need.

    Every imported module is mapped to its distribution
    (``importlib.metadata.packages_distributions``); the standard library, the kernel
    (:data:`KERNEL_DISTRIBUTIONS`), Colab's own modules, the package and its base
    dependencies need no extra.

    Raises:
        ConfigError: a module is not installed here, or its distribution is declared
            neither as a dependency nor in an extra of ``pyproject.toml``.
    """
    project = _project(root)
    have = {_normalise(project["name"])} | _requirement_names(project["dependencies"])
    have |= KERNEL_DISTRIBUTIONS
    extras = {
        extra: _requirement_names(reqs)
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    owners = _module_owners()
    needed: set[str] = set()
    for module in sorted(notebook_imports(nb)):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or module.startswith(COLAB_MODULES):
            continue
        dists = {_normalise(d) for d in owners.get(top, [])}
        if not dists:
            raise ConfigError(
                f"{name} imports `{module}`, which is not installed here: install it "
                "and declare its distribution in pyproject.toml (dependencies or an "
                "extra) so that the notebook's install cell can be written"
            )
        if dists & have:
            continue
        found = [extra for extra, names in extras.items() if dists & names]
        if not found:
            raise ConfigError(
                f"{name} imports `{module}` (distribution {', '.join(sorted(dists))}), "
                "which pyproject.toml declares neither in [project] dependencies nor "
                "in an extra: add it there, or the notebook will not run in Colab"
            )
        needed.add(found[0])
    return sorted(needed)


def install_cell_source(repo: Repository, extras: list[str] = ()) -> str:
    """The first code cell of every notebook: in Colab, clone and install; else nothing.

    It clones ``repo`` at its branch into ``/content/medlora`` (once), pip-installs the
    package with ``extras`` (only when it is not importable yet, so re-running the
    cell after a restart is instant) and changes into ``notebooks/``.
    """
    target = "CLONE_DIR" if not extras else f'f"{{CLONE_DIR}}[{",".join(extras)}]"'
    # Plain assignments and short lines: ruff formats the cell the same whatever the
    # URL's length (the notebooks are linted and format-checked).
    return f"""\
# In Colab: clone the book's repository and install what this chapter imports;
# elsewhere this cell does nothing. Written from _config.yml by
# `{SYNC_COMMAND}`: edit that file, not this cell.
import importlib.util
import os
import subprocess
import sys

REPOSITORY = "{repo.url}"
BRANCH = "{repo.branch}"
CLONE_DIR = "{COLAB_CLONE_DIR}"
if "google.colab" in sys.modules:
    if not os.path.isdir(CLONE_DIR):
        clone = ["git", "clone", "--depth", "1", "--branch", BRANCH, REPOSITORY]
        subprocess.run([*clone, CLONE_DIR], check=True)
    if importlib.util.find_spec("medlora_lib") is None:
        pip = [sys.executable, "-m", "pip", "install", "-q", {target}]
        subprocess.run(pip, check=True)
        importlib.invalidate_caches()
    os.chdir(f"{{CLONE_DIR}}/notebooks")
    print(f"Colab: {{REPOSITORY}} ({{BRANCH}}) installed from {{CLONE_DIR}}")"""


def colab_table(repo: Repository, root: Path = REPO_ROOT) -> str:
    """The Markdown table of ``book/gpu_colab.md``: one row and badge per notebook."""
    rows = ["| chapter | open in Colab |", "|---|---|"]
    for nb in list_notebooks(root):
        title = notebook_title(nb).replace("|", r"\|")
        link = repo.colab_url(f"notebooks/{nb.name}")
        rows.append(f"| {title} | [![Open in Colab]({COLAB_BADGE})]({link}) |")
    return "\n".join(rows)


def _rewrite_links(
    text: str, repo: Repository, root: Path, where: str, problems: list[str]
) -> tuple[str, list[str]]:
    """``text`` with its Colab links, clone and ``git+`` URLs made ``repo``'s."""
    changed: list[str] = []

    def colab(m: re.Match) -> str:
        if not (root / m["path"]).exists():
            problems.append(
                f"{where}: a Colab link opens {m['path']}, which does not exist"
            )
        new = repo.colab_url(m["path"])
        if new != m[0]:
            changed.append("Colab link")
        return new

    def url(m: re.Match) -> str:
        new = f"{m['pre']}{repo.url}{m['git'] or ''}"
        if new != m[0]:
            changed.append(
                "clone URL" if m["pre"].startswith("git clone") else "git+ URL"
            )
        return new

    text = _COLAB_LINK.sub(colab, text)
    text = _GIT_CLONE.sub(url, text)
    text = _PIP_GIT.sub(url, text)
    return text, changed


def _summary(what: list[str]) -> str:
    counts: dict[str, int] = {}
    for w in what:
        counts[w] = counts.get(w, 0) + 1
    return ", ".join(w if n == 1 else f"{n} {w}s" for w, n in counts.items())


def _sync_markdown(path: Path, repo: Repository, root: Path, problems: list[str]):
    where = str(path.relative_to(root))
    old = path.read_text(encoding="utf-8")
    new, what = _rewrite_links(old, repo, root, where, problems)
    if where == COLAB_PAGE:
        start, end = new.find(COLAB_TABLE_START), new.find(COLAB_TABLE_END)
        if start < 0 or end < start:
            problems.append(
                f"{where} has no `{COLAB_TABLE_START}` ... `{COLAB_TABLE_END}` "
                "markers: put them where the table of Colab links belongs"
            )
        else:
            head = new[: start + len(COLAB_TABLE_START)]
            table = f"{head}\n{colab_table(repo, root)}\n{new[end:]}"
            if table != new:
                what.append("Colab table")
            new = table
    return new, what


def _cell(source: str, cell_id: str, tags: list[str]) -> dict:
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": cell_id,
        "metadata": {"tags": tags},
        "outputs": [],
        "source": source.splitlines(keepends=True),
    }


def _sync_notebook(path: Path, repo: Repository, root: Path, problems: list[str]):
    where = str(path.relative_to(root))
    old = path.read_text(encoding="utf-8")
    nb = json.loads(old)
    what: list[str] = []
    for cell in nb["cells"]:
        if cell.get("id") == INSTALL_CELL_ID:
            continue
        src, changed = _rewrite_links(
            "".join(cell["source"]), repo, root, where, problems
        )
        if changed:
            cell["source"] = src.splitlines(keepends=True)
            what += changed
    try:
        extras = notebook_extras(nb, where, root)
    except ConfigError as exc:
        problems.append(str(exc))
        extras = []
    want = _cell(install_cell_source(repo, extras), INSTALL_CELL_ID, ["hide-cell"])
    cells = [c for c in nb["cells"] if c.get("id") != INSTALL_CELL_ID]
    first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), 0)
    cells.insert(first_code, want)
    if cells != nb["cells"]:
        what.append("Colab install cell")
        nb["cells"] = cells
    new = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    return (new if what else old), what


def _sync_citation(path: Path, repo: Repository, root: Path, problems: list[str]):
    where = str(path.relative_to(root))
    if not path.exists():
        problems.append(f"{where} not found: the project's citation file belongs there")
        return "", []
    old = path.read_text(encoding="utf-8")
    data = yaml.safe_load(old) or {}
    version = _project(root)["version"]
    new, what = old, []
    for key, value, label in (
        ("repository-code", repo.url, "repository URL"),
        ("version", version, "version (pyproject.toml)"),
    ):
        if str(data.get(key, "")) == value:
            continue
        line = f'{key}: "{value}"'
        pattern = re.compile(rf"^{re.escape(key)}:.*$", re.MULTILINE)
        new = (
            pattern.sub(line, new, count=1) if pattern.search(new) else f"{new}{line}\n"
        )
        what.append(label)
    return new, what


def sync_repository_links(check: bool = False, root: Path = REPO_ROOT) -> list[str]:
    """Make every repository link in the tree follow ``repository`` in ``_config.yml``.

    Rewrites, in ``book/*.md``, ``README.md`` and ``notebooks/NN_*.ipynb``: Colab
    links (``https://colab.research.google.com/github/<owner>/<repo>/blob/<branch>/
    notebooks/<name>.ipynb``), ``git clone <url>`` and ``pip install git+<url>``;
    regenerates the Colab table of ``book/gpu_colab.md`` (between
    :data:`COLAB_TABLE_START` and :data:`COLAB_TABLE_END`, one row per notebook) and
    each notebook's install cell (:func:`install_cell_source`, the first code cell);
    sets ``repository-code`` and ``version`` of ``CITATION.cff``.

    Args:
        check: only report what is out of sync; write nothing.
        root: the repository (a copy of it in the tests).

    Returns:
        One line per file that was (``check``: would be) changed, saying what changed.

    Raises:
        ConfigError: something no rewrite can fix: a bad ``repository`` setting, a
            Colab link to a notebook that does not exist, missing table markers, a
            missing ``CITATION.cff``, a notebook import that ``pyproject.toml`` does
            not declare.
    """
    repo = repository(root)
    problems: list[str] = []
    jobs = [(p, _sync_markdown) for p in sorted((root / "book").glob("*.md"))]
    if (root / "README.md").exists():
        jobs.append((root / "README.md", _sync_markdown))
    jobs += [(p, _sync_notebook) for p in list_notebooks(root)]
    jobs.append((root / CITATION_FILE, _sync_citation))
    changes: list[tuple[Path, str, list[str]]] = []
    for path, sync in jobs:
        new, what = sync(path, repo, root, problems)
        if what:
            changes.append((path, new, what))
    if problems:
        raise ConfigError(
            "cannot sync the repository links:\n  " + "\n  ".join(problems)
        )
    if not check:
        for path, new, _ in changes:
            path.write_text(new, encoding="utf-8")
    return [f"{p.relative_to(root)}: {_summary(what)}" for p, _, what in changes]


def check_repository_links(root: Path = REPO_ROOT) -> None:
    """Refuse to build while a link disagrees with ``repository`` in ``_config.yml``.

    Raises:
        ConfigError: names each file out of sync and the command that fixes them.
    """
    stale = sync_repository_links(check=True, root=root)
    if stale:
        repo = repository(root)
        raise ConfigError(
            f"these files disagree with repository.url ({repo.url}) / "
            f"repository.branch ({repo.branch}) in {CONFIG_FILE}:\n  "
            + "\n  ".join(stale)
            + f"\nrun `{SYNC_COMMAND}` to rewrite them"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line: execute the notebooks and build the site."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--out", default="_build", type=Path)
    ap.add_argument("--only", nargs="*", help="substrings of notebooks to run")
    ap.add_argument("--no-execute", action="store_true", help="reuse executed copies")
    ap.add_argument(
        "--sync-links",
        action="store_true",
        help="rewrite the Colab links, clone commands, install cells and CITATION.cff "
        "from repository.url / repository.branch in _config.yml, then stop",
    )
    ap.add_argument(
        "--check-links",
        action="store_true",
        help="only report what --sync-links would change (exit 1 if anything)",
    )
    args = ap.parse_args(argv)
    out = args.out.resolve()
    executed = out / f"executed-{args.profile}"
    t0 = time.perf_counter()
    if args.sync_links:
        changes = sync_repository_links()
        for line in changes:
            print(f"[links] updated {line}")
        repo = repository()
        print(f"[links] in sync with {repo.url} (branch {repo.branch})")
        return 0
    if args.check_links:
        changes = sync_repository_links(check=True)
        for line in changes:
            print(f"[links] out of sync: {line}")
        if changes:
            print(f"[links] run: {SYNC_COMMAND}")
        return 1 if changes else 0
    # Before the notebooks run for half an hour, not after.
    check_repository_links()
    if not args.no_execute:
        execute_notebooks(executed, profile=args.profile, only=args.only)
    site_src = assemble_site(executed, out / f"site-{args.profile}")
    html = build_site(site_src)
    problems = check_site(html)
    if problems:
        print("[book] broken links or images:\n  " + "\n  ".join(problems[:30]))
        return 1
    print(f"[book] site: {html / 'index.html'}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
