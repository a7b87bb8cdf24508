"""End to end: synthetic data in the official raw layouts -> `medlora prepare` -> arrays.

The commands are read from ``book/real_data.md``: its rehearsal block (``medlora synth``
of the ACDC, M&Ms and M&Ms-2 layouts, then the three ``medlora prepare``) is run as
written, with its paths moved under a temporary folder, and its ``prepare`` lines must
be those of the paper block in all but the paths and the profile. So the researcher's
walk-through is, command for command, what this test runs.

The prepared arrays must equal what the generator's own preprocessing gives for the
same subjects: this catches off-by-one ED/ES frames (ACDC 1-based, M&Ms 0-based, M&Ms-2
separate ED/ES files), swapped label maps (ACDC RV 1 / LV 3) and orientation mistakes
in the NIfTI writers or readers. Also: the CLI turns user mistakes into `error:` lines
with exit status 2.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest

from medlora_lib.cli import build_parser, main, synth_config
from medlora_lib.data.manifest import MANIFEST_COLUMNS, normalise_vendor, read_manifest
from medlora_lib.data.synthetic import prepared_records

BOOK = Path(__file__).resolve().parents[1] / "book" / "real_data.md"
#: What the walk-through prepares, in order: (dataset, options other than --profile).
WALKTHROUGH = [
    ("acdc", ()),
    ("mnms", ("--merge",)),
    ("mnms2", ("--merge",)),
]
_REHEARSAL_ROOT = PurePosixPath("/tmp")
_LAYOUT_TOPS = {"database", "OpenDataset", "MnM2"}


def book_commands(path: Path | None = None) -> list[list[list[str]]]:
    """The ``medlora prepare`` / ``medlora synth`` lines of each fenced bash block of
    ``book/real_data.md``, as argument lists without the leading ``medlora``."""
    text = (path or BOOK).read_text()
    blocks = re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.S | re.M)
    out = []
    for block in blocks:
        joined = block.replace("\\\n", " ")  # line continuations
        cmds = [
            shlex.split(line)[1:]
            for line in joined.splitlines()
            if re.match(r"\s*medlora\s+(prepare|synth)\b", line)
        ]
        if cmds:
            out.append(cmds)
    anywhere = re.findall(r"^\s*\$?\s*medlora\s+(?:prepare|synth)\b", text, re.M)
    assert len(anywhere) == sum(map(len, out)), "a medlora line outside a bash block"
    return out


def _shape(argv: list[str]) -> tuple[str, tuple[str, ...], str | None]:
    """(dataset, options except --profile, the layout folder the raw path names)."""
    args = build_parser().parse_args(argv)
    rest = argv[4:]
    if "--profile" in rest:
        i = rest.index("--profile")
        rest = rest[:i] + rest[i + 2 :]
    flags = tuple(rest)
    top = args.raw_dir.name if args.raw_dir.name in _LAYOUT_TOPS else None
    return args.dataset, flags, top


def _walkthrough() -> tuple[list[list[str]], list[list[str]]]:
    """(the paper block's prepare lines, the rehearsal block's lines)."""
    blocks = book_commands()
    paper = [b for b in blocks if all(c[0] == "prepare" for c in b)]
    rehearsal = [b for b in blocks if any(c[0] == "synth" for c in b)]
    assert len(paper) == 1 and len(rehearsal) == 1, (
        "book/real_data.md: expected one block of `medlora prepare` lines and one "
        f"rehearsal block with `medlora synth`, found {blocks}"
    )
    assert len(blocks) == 2, f"unexpected medlora blocks in {BOOK.name}: {blocks}"
    return paper[0], rehearsal[0]


def _local(argv: list[str], root: Path) -> list[str]:
    """The command with its rehearsal paths moved under ``root``."""
    out = []
    for a in argv:
        if a.startswith(f"{_REHEARSAL_ROOT}/"):
            a = str(root / PurePosixPath(a).relative_to(_REHEARSAL_ROOT))
        out.append(a)
    return out


def test_book_walkthrough_is_what_the_test_runs():
    paper, rehearsal = _walkthrough()
    rehearsed = [c for c in rehearsal if c[0] == "prepare"]
    synths = [c for c in rehearsal if c[0] == "synth"]
    assert rehearsal == synths + rehearsed, "synth lines first, then prepare"
    # the paper block: the walk-through's datasets and flags, one prepared folder
    assert [_shape(c)[:2] for c in paper] == WALKTHROUGH
    assert {build_parser().parse_args(c).profile for c in paper} == {"paper"}
    assert len({c[3] for c in paper}) == 1
    # the rehearsal: the same prepare lines (and raw-folder forms), profile smoke
    assert [_shape(c) for c in rehearsed] == [_shape(c) for c in paper]
    assert {build_parser().parse_args(c).profile for c in rehearsed} == {"smoke"}
    assert len({c[3] for c in rehearsed}) == 1
    # ... on the layouts its synth lines write, one per dataset
    layouts = {build_parser().parse_args(c).layout: c[1] for c in synths}
    assert sorted(layouts) == sorted(d for d, _ in WALKTHROUGH) and len(synths) == 3
    for c in rehearsed:
        raw, top = PurePosixPath(c[2]), _shape(c)[2]
        assert (raw.parent if top else raw) == PurePosixPath(layouts[c[1]]), c
    for c in rehearsal:
        paths = [a for a in c if a.startswith("/")]
        assert all(PurePosixPath(a).is_relative_to(_REHEARSAL_ROOT) for a in paths)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run the book's rehearsal block: (root, the prepared folder, synth args)."""
    root = tmp_path_factory.mktemp("e2e")
    _, rehearsal = _walkthrough()
    synth_args = {}
    for argv in rehearsal:
        local = _local(argv, root)
        assert main(local) == 0, local
        if argv[0] == "synth":
            args = build_parser().parse_args(local)
            synth_args[args.layout] = args
    out = Path(_local([rehearsal[-1][3]], root)[0])
    return root, out, synth_args


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The generator's preprocessed layout (ACDC + M&Ms part) at the smoke profile."""
    ref = tmp_path_factory.mktemp("ref") / "preprocessed"
    argv = ["synth", str(ref), "--layout", "preprocessed", "--profile", "smoke"]
    assert main(argv) == 0
    return ref


def test_prepared_manifest_schema(walkthrough):
    root, prepared, synth_args = walkthrough
    df = read_manifest(prepared)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert set(df.vendor) == {"Siemens", "Philips", "GE", "Canon"}
    assert set(df.dataset) == {"acdc", "mnms", "mnms2"}
    assert ((df.pathology == "NOR") == (df.label == 0)).all()
    for _, client in df.groupby("vendor"):
        assert set(client.split) == {"train", "val", "test"}
    # M&Ms-2 subjects sit under the vendor of their CSV row (no Canon)
    raw = Path(synth_args["mnms2"].out_dir) / "MnM2"
    csv = pd.read_csv(raw / "dataset_information.csv", dtype={"SUBJECT_CODE": int})
    m2 = df[df.dataset == "mnms2"].set_index("subject_id")
    assert len(m2) == len(csv) == 9
    for row in csv.itertuples():
        sub = m2.loc[f"mnms2_{row.SUBJECT_CODE:03d}"]
        assert sub.vendor == normalise_vendor(row.VENDOR) != "Canon"
        assert sub.pathology == row.DISEASE
    assert m2.vendor.value_counts().to_dict() == {"Siemens": 3, "Philips": 3, "GE": 3}


def test_raw_roundtrip_matches_generator(walkthrough, reference):
    _, prepared, _ = walkthrough
    ref = pd.read_csv(reference / "manifest.csv")
    got = read_manifest(prepared)
    got = got[got.dataset.isin(["acdc", "mnms"])]
    # Same subjects (same order within each vendor and dataset part), same classes.
    ref_parts = (
        ref.sort_values("subject_id").groupby("vendor")["pathology"].apply(sorted)
    )
    got_parts = (
        got.sort_values("subject_id").groupby("vendor")["pathology"].apply(sorted)
    )
    assert ref_parts.to_dict() == got_parts.to_dict()
    assert len(ref) == len(got)
    # Each prepared case equals one reference case of the same vendor and pathology.
    ref_arrays = {
        row.subject_id: np.load(reference / row.path) for row in ref.itertuples()
    }
    matched = unlabelled = 0
    for row in got.itertuples():
        z = np.load(prepared / row.path)
        if not z["label"].any():
            # M&Ms GE training cases ship without segmentation (Training/Unlabeled):
            # preprocessing falls back to the image centre, so the crop differs.
            assert row.vendor == "GE", f"{row.subject_id} lost its labels"
            unlabelled += 1
            continue
        candidates = ref[(ref.vendor == row.vendor) & (ref.pathology == row.pathology)]
        errs = [
            np.abs(z["image"] - ref_arrays[c]["image"]).max()
            for c in candidates.subject_id
        ]
        best = candidates.subject_id.iloc[int(np.argmin(errs))]
        assert min(errs) < 1e-3, f"{row.subject_id}: no matching reference case"
        assert np.array_equal(z["label"], ref_arrays[best]["label"]), row.subject_id
        matched += 1
    assert matched + unlabelled == len(got) and matched > len(got) // 2


def test_mnms2_roundtrip_matches_generator(walkthrough, reference):
    """Each prepared M&Ms-2 case is the generator's subject of the same number, and
    none of them is an ACDC / M&Ms subject of the reference (other people)."""
    _, prepared, synth_args = walkthrough
    config = synth_config(synth_args["mnms2"])
    records = list(prepared_records(config, parts=("mnms2",)))
    got = read_manifest(prepared)
    got = got[got.dataset == "mnms2"].sort_values("subject_id")
    assert list(got.subject_id) == [f"mnms2_{k:03d}" for k in range(1, 10)]
    ref = pd.read_csv(reference / "manifest.csv")
    others = [np.load(reference / p)["image"] for p in ref.path]
    for row, rec in zip(got.itertuples(), records, strict=True):
        z = np.load(prepared / row.path)
        assert (row.vendor, row.pathology, row.label) == (
            rec.vendor,
            rec.pathology,
            rec.label,
        )
        assert np.abs(z["image"] - rec.image).max() < 1e-3, row.subject_id
        assert np.array_equal(z["label"], rec.seg), row.subject_id
        assert min(np.abs(z["image"] - o).max() for o in others) > 0.1


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    assert (
        main(["prepare", "acdc", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err
    assert main(["config", "--profile", "cpu", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "medlora_lib.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "prepare" in out.stdout and "synth" in out.stdout
