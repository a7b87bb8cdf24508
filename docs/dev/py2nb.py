"""Developer tool: turn a py-percent script into a notebook stored without outputs.

    python docs/dev/py2nb.py SRC.py notebooks/NN_name.ipynb

Cells start with `# %%` (code), `# %% [markdown]` (markdown, each line prefixed
with `# `) or `# %% tags=["parameters"]` (the papermill parameters cell).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat


def convert(src: Path, dst: Path) -> None:
    text = src.read_text()
    chunks = re.split(r"^# %%(.*)$", text, flags=re.M)
    cells = []
    for header, body in zip(chunks[1::2], chunks[2::2], strict=True):
        body = body.strip("\n")
        if "[markdown]" in header:
            lines = [
                ln[2:] if ln.startswith("# ") else ln.lstrip("#")
                for ln in body.splitlines()
            ]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if "parameters" in header:
                cell.metadata["tags"] = ["parameters"]
            cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, dst)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
