"""The reproducibility appendix's timing table is written from the build's timings.json."""

from __future__ import annotations

import json

from medlora_lib.bookrun import timings_table


def test_timings_table_lists_every_notebook_and_the_total(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(
        json.dumps({"profile": "cpu", "seconds": {"00_a": 12.4, "01_b": 30.0}})
    )
    text = timings_table(path)
    assert "Profile `cpu`" in text and "CPU cores" in text
    assert "| `00_a` | 12 |" in text and "| `01_b` | 30 |" in text
    assert "**42**" in text


def test_timings_table_without_a_build_says_so(tmp_path):
    assert "No timings recorded" in timings_table(tmp_path / "missing.json")
