"""Execute the notebooks with papermill, then build the site with jupyter-book (v1).

The book is executed exactly once: papermill runs every notebook (``cpu`` profile by
default, or ``smoke`` with the values of ``notebooks/smoke_parameters.yaml``), the executed
copies are assembled with the prose chapters into a staging folder, and jupyter-book
renders that folder with execution turned off.

Usage: ``python -m medlora_lib.bookrun --profile cpu --out _build`` (``make book``).
Explained in the book: ``book/reproducibility.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "REPO_ROOT",
    "list_notebooks",
    "notebook_parameters",
    "execute_notebooks",
    "assemble_site",
    "build_site",
    "check_site",
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


def notebook_parameters(notebook: Path, profile: str) -> dict[str, Any]:
    """Papermill parameters for ``notebook`` under ``profile``.

    ``cpu`` runs with the defaults stored in the notebook's ``parameters`` cell;
    ``smoke`` takes ``common`` plus the notebook's own section from
    ``notebooks/smoke_parameters.yaml``; other profiles only set ``profile``.
    """
    if profile == "cpu":
        return {}
    params: dict[str, Any] = {"profile": profile}
    if profile == "smoke":
        spec = yaml.safe_load(SMOKE_PARAMETERS.read_text()) or {}
        params.update(spec.get("common", {}) or {})
        params.update(spec.get(notebook.stem, {}) or {})
    return params


def execute_notebooks(
    out_dir: Path,
    profile: str = "cpu",
    only: list[str] | None = None,
    timeout: int = 3600,
) -> dict[str, float]:
    """Execute each notebook with papermill into ``out_dir/notebooks``.

    Returns:
        Seconds per notebook (also written to ``out_dir/timings.json``).
    """
    nb_out = out_dir / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    # The kernel inherits this environment: a non-interactive MPLBACKEND (Agg, set for
    # headless tests) would stop plt.show() from embedding figures in the notebooks.
    saved_backend = os.environ.pop("MPLBACKEND", None)
    try:
        return _execute(nb_out, out_dir, profile, only, timeout)
    finally:
        if saved_backend is not None:
            os.environ["MPLBACKEND"] = saved_backend


def _execute(
    nb_out: Path, out_dir: Path, profile: str, only: list[str] | None, timeout: int
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
        RuntimeError: the build failed, or (``strict``) it printed a warning about a
            missing file, a broken cross-reference or an unreadable image.
    """
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


def main(argv: list[str] | None = None) -> int:
    """Command line: execute the notebooks and build the site."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--out", default="_build", type=Path)
    ap.add_argument("--only", nargs="*", help="substrings of notebooks to run")
    ap.add_argument("--no-execute", action="store_true", help="reuse executed copies")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    executed = out / f"executed-{args.profile}"
    t0 = time.perf_counter()
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
