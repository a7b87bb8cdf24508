"""Every notebook runs at the smoke profile (papermill) and the site builds strictly.

Parameters come from `notebooks/smoke_parameters.yaml` only; the build fails on warnings
that mean a broken site (missing files, broken cross-references, unreadable images),
and the rendered pages are checked for broken internal links and for their figures.
"""

from __future__ import annotations

import os

import nbformat
import pytest

from medlora_lib import bookrun

pytestmark = pytest.mark.slow
NOTEBOOKS = bookrun.list_notebooks()


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    os.environ["MEDLORA_CACHE"] = str(out / "cache")
    timings = bookrun.execute_notebooks(out / "executed", profile="smoke")
    return out, timings


def test_there_are_notebooks():
    names = [nb.stem for nb in NOTEBOOKS]
    assert names[:2] == [
        "00_foundation_model_and_lora",
        "01_data_and_vendor_heterogeneity",
    ]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_and_has_figures(executed, nb_path):
    out, timings = executed
    assert nb_path.stem in timings
    nb = nbformat.read(out / "executed" / "notebooks" / nb_path.name, as_version=4)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(figures) >= 3, f"{nb_path.name} rendered only {len(figures)} figures"


def test_site_builds_strictly(executed):
    out, _ = executed
    site = bookrun.assemble_site(out / "executed", out / "site")
    html = bookrun.build_site(site, strict=True)
    assert (html / "index.html").exists()
    assert bookrun.check_site(html) == []
    for nb in NOTEBOOKS:
        page = html / "notebooks" / f"{nb.stem}.html"
        assert page.exists(), f"{page} missing from the site"
        assert "<img" in page.read_text(), f"{page.name} has no figures"
