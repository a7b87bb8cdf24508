"""``book/gpu_colab.md``'s commands are what the code and the tests run.

The researcher's walk-through continues from ``book/real_data.md`` (whose commands
``tests/test_cli_end_to_end.py`` runs) to this chapter: its papermill loop must pass the
parameters ``medlora book --profile paper`` passes (``bookrun.notebook_parameters``),
and its ``medlora run`` line must be the command ``tests/test_paper_path.py`` runs end to
end on CPU (which adds only ``--set fed.num_rounds=1``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from medlora_lib.bookrun import notebook_parameters
from medlora_lib.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "gpu_colab.md"


def _bash_lines() -> list[str]:
    """Every command of the chapter's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", CHAPTER.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        lines += [
            ln.split("#")[0].strip()
            for ln in block.replace("\\\n", " ").splitlines()
            if ln.split("#")[0].strip()
        ]
    return lines


def test_the_papermill_loop_passes_what_medlora_book_passes():
    lines = _bash_lines()
    loop = next(ln for ln in lines if ln.startswith("for nb in"))
    notebooks = loop.removeprefix("for nb in").split(";")[0].split()
    call = next(ln for ln in lines if ln.startswith("papermill "))
    argv = shlex.split(call)
    params = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "-p"}
    assert notebooks, "the chapter's papermill loop names no notebook"
    for stem in notebooks:
        expected = notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb", "paper")
        assert params == {k: str(v) for k, v in expected.items()}, stem


def test_the_run_command_is_the_one_the_paper_path_test_runs():
    run = [ln for ln in _bash_lines() if ln.startswith("medlora run ")]
    assert len(run) == 1, run
    args = build_parser().parse_args(shlex.split(run[0])[1:])
    assert (args.command, args.method, args.profile) == (
        "run",
        "med_dual_lora",
        "paper",
    )
    assert args.data and args.out
    test = (ROOT / "tests" / "test_paper_path.py").read_text()
    for token in ('"run"', '"--method"', '"med_dual_lora"', '"--profile"', '"paper"'):
        assert token in test, token
    for flag in ('"--data"', '"--out"'):
        assert flag in test, flag
