"""The prepared-data folder: manifest, vendors, splits, and safe (atomic) writing.

A prepared data folder ``OUT_DIR`` holds ``manifest.csv`` (one row per subject),
``arrays/<subject_id>.npz`` (keys ``image``, ``label``) and ``dataset.json`` (the
preprocessing parameters, the sources and the split parameters). Explained in
``notebooks/01_data_and_vendor_heterogeneity``.

Decisions:

* **Splits** are stratified by label *within each client* (default client = vendor),
  seed-deterministic and independent of row order (subjects are sorted by id, and each
  client's permutation is seeded by ``(seed, client name)`` so one client's split does not
  depend on the others). For each class of ``n`` subjects: ``n * test_fraction`` go to
  test and ``n * val_fraction`` to val (rounded half up), at least one each when ``n >= 3``
  (so both classes appear in every split when counts allow) and at least one always stays
  in train. A client with no subjects is an error. A client with only one class (in
  the real M&Ms download, a vendor may have only diseased subjects) is written with a
  :class:`~medlora_lib.errors.DataWarning` naming it and its counts: preparing data
  does not depend on which federation uses them; a federation refuses such a site at
  run time unless ``fed.allow_single_class`` (:mod:`medlora_lib.fl.sites`).
  :func:`assign_splits` alone refuses it unless ``allow_single_class=True``.
* **Writing** is atomic: everything is written into a hidden temporary sibling folder
  ``.OUT_DIR.tmp-<host>-<pid>-<tag>`` that is renamed onto ``OUT_DIR`` at the end; on
  any exception it is removed, so ``OUT_DIR`` never holds a half-written data set. A
  process killed outright (SIGKILL, power loss) cannot remove it: the next write to
  ``OUT_DIR`` removes such folders whose process (same host, pid) is gone, and says so;
  if the kill came between moving the old folder aside and moving the new one in, the
  old folder is put back first.
* **An existing data set** in ``OUT_DIR`` is compared by content: preprocessing
  parameters, split parameters (fractions, seed, client column), sources (name and what
  defines them, e.g. the synthetic generator's config and seed, but not where the raw
  download lies) and the list of subject ids. The same data set is rebuilt in place (so
  re-running a ``prepare`` repairs a damaged folder); a different one is refused, naming
  what differs, unless ``overwrite=True`` (replace it) or ``merge=True`` (add new
  sources to it: only when the preprocessing parameters are equal and the new sources
  and subject ids are not already there; splits are then recomputed over the merged
  manifest with the *new* split parameters, so the splits of subjects already there can
  change). A non-empty folder that is not a medlora data set is always refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medlora_lib.errors import DataError, DataWarning

__all__ = [
    "MANIFEST_COLUMNS",
    "VENDORS",
    "SPLITS",
    "normalise_vendor",
    "pathology_to_label",
    "PreparedRecord",
    "assign_splits",
    "write_prepared_dataset",
    "clean_stale_work_dirs",
    "read_manifest",
    "read_dataset_info",
]

MANIFEST_COLUMNS = (
    "subject_id",
    "dataset",
    "vendor",
    "centre",
    "pathology",
    "label",
    "split",
    "path",
)
VENDORS = ("Siemens", "Philips", "GE", "Canon")
SPLITS = ("train", "val", "test")

_VENDOR_ALIASES = {
    "siemens": "Siemens",
    "siemens healthineers": "Siemens",
    "a": "Siemens",
    "philips": "Philips",
    "philips medical systems": "Philips",
    "philips healthcare": "Philips",
    "b": "Philips",
    "ge": "GE",
    "ge medical systems": "GE",
    "ge healthcare": "GE",
    "general electric": "GE",
    "c": "GE",
    "canon": "Canon",
    "canon medical systems": "Canon",
    "toshiba": "Canon",
    "toshiba medical systems": "Canon",
    "d": "Canon",
}


def normalise_vendor(name: object) -> str:
    """Map a vendor string from any source to one of :data:`VENDORS`.

    Case-insensitive; accepts the DICOM manufacturer strings (``SIEMENS``,
    ``Philips Medical Systems``, ``GE MEDICAL SYSTEMS``, ``TOSHIBA``), the short names and
    the M&Ms-1 letter codes ``A`` (Siemens), ``B`` (Philips), ``C`` (GE), ``D`` (Canon).

    Raises:
        DataError: the value is not a known vendor (the message lists the allowed ones).
    """
    key = " ".join(str(name).strip().lower().replace("_", " ").split())
    if key in _VENDOR_ALIASES:
        return _VENDOR_ALIASES[key]
    for canonical in VENDORS:  # e.g. "Siemens Healthcare GmbH"
        if key.split(" ")[0] == canonical.lower():
            return canonical
    raise DataError(
        f"unknown vendor {name!r}; expected one of {', '.join(VENDORS)} (any case), a "
        "manufacturer string such as 'Philips Medical Systems', or an M&Ms code A/B/C/D."
    )


def pathology_to_label(pathology: object) -> int:
    """Binary disease label: 0 for ``NOR`` (healthy), 1 for any other pathology."""
    return 0 if str(pathology).strip().upper() == "NOR" else 1


@dataclass
class PreparedRecord:
    """One preprocessed subject, ready to be written by :func:`write_prepared_dataset`."""

    subject_id: str
    dataset: str
    vendor: str
    centre: str
    pathology: str
    label: int
    image: np.ndarray  # (2, H, W, D) float32 in [0, 1]
    seg: np.ndarray  # (2, H, W, D) uint8, medlora label map


# ----------------------------------------------------------------------------- splits


def _client_seed(seed: int, client: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(str(client).encode())])


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    # round half up (not Python's half-to-even), so 2.5 -> 3 as a reader expects
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_val = int(np.floor(n * val_fraction + 0.5))
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    # keep at least one in train; take back from the larger of val / test
    while n_test + n_val > max(n - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def assign_splits(
    df: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    client_column: str = "vendor",
    *,
    clients: Sequence[str] | None = None,
    allow_single_class: bool = False,
) -> pd.DataFrame:
    """Assign ``train`` / ``val`` / ``test`` stratified by label within each client.

    Args:
        df: table with ``subject_id``, ``label`` and ``client_column``.
        val_fraction: fraction of each client's subjects (per class) for validation.
        test_fraction: fraction for test.
        seed: split seed; the result depends only on (seed, subject ids, labels, clients),
            not on row order.
        client_column: the column defining a federated client (``vendor``; ``dataset``
            or ``centre`` give other client definitions).
        clients: if given, clients that must be present (an absent one is an error).
        allow_single_class: warn (a :class:`~medlora_lib.errors.DataWarning`) instead
            of failing on a single-class client.

    Returns:
        A copy of ``df`` (same row order) with the ``split`` column set.

    Raises:
        DataError: bad fractions, missing columns, an empty client, or a single-class
            client (unless ``allow_single_class``).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1) or (
        val_fraction + test_fraction >= 1
    ):
        raise DataError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in "
            "[0, 1) with a sum below 1 (some subjects must stay for training)."
        )
    missing = [c for c in ("subject_id", "label", client_column) if c not in df.columns]
    if missing:
        raise DataError(
            f"cannot split: the table has no column(s) {missing}; columns are "
            f"{list(df.columns)}."
        )
    if df.empty:
        raise DataError("cannot split an empty table: no subjects were found.")
    if df["subject_id"].duplicated().any():
        dups = sorted(df.loc[df["subject_id"].duplicated(), "subject_id"].unique())[:5]
        raise DataError(f"duplicate subject ids {dups}; each subject must appear once.")
    present = set(df[client_column].astype(str))
    for client in clients or ():
        if str(client) not in present:
            raise DataError(
                f"client {client!r} ({client_column}) has no subjects; add data for it "
                f"or remove it from the client list (present: {sorted(present)})."
            )

    out = df.copy()
    split = pd.Series("train", index=out.index, dtype=object)
    for client in sorted(present):
        sub = out[out[client_column].astype(str) == client]
        counts = sub["label"].astype(int).value_counts().to_dict()
        n_healthy, n_disease = counts.get(0, 0), counts.get(1, 0)
        if n_healthy == 0 or n_disease == 0:
            counts_text = (
                f"client {client!r} ({client_column}) has a single class: "
                f"{n_healthy} healthy (label 0) and {n_disease} diseased (label 1) "
                "subjects, so splits cannot be stratified and specificity or "
                "sensitivity is undefined there."
            )
            if not allow_single_class:
                raise DataError(
                    f"{counts_text} Fix: add a source with both classes for this "
                    "client (`--merge`), choose another client column, or allow it "
                    "explicitly (allow_single_class=True)."
                )
            warnings.warn(
                f"{counts_text} Written anyway; a federation with it as a site "
                "refuses it unless fed.allow_single_class=true (or leave it out with "
                f"fed.exclude={client}, or add a source with both classes with "
                "`--merge`).",
                DataWarning,
                stacklevel=2,
            )
        rng = _client_seed(seed, client)
        for label_value in sorted(sub["label"].astype(int).unique()):
            ids = sorted(sub.loc[sub["label"].astype(int) == label_value, "subject_id"])
            order = [ids[i] for i in rng.permutation(len(ids))]
            n_val, n_test = _split_counts(len(ids), val_fraction, test_fraction)
            chosen = {sid: "test" for sid in order[:n_test]}
            chosen.update({sid: "val" for sid in order[n_test : n_test + n_val]})
            rows = sub.index[sub["subject_id"].isin(chosen)]
            split.loc[rows] = [chosen[s] for s in sub.loc[rows, "subject_id"]]
    out["split"] = split.values
    return out


# ----------------------------------------------------------------------------- reading


def read_dataset_info(data_dir: str | Path) -> dict | None:
    """``dataset.json`` of a prepared folder, or None when there is none."""
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"`{path}` is not valid JSON ({exc}); rebuild the folder with "
            "`medlora prepare ... --overwrite`."
        ) from exc


def read_manifest(data_dir: str | Path, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate ``DATA_DIR/manifest.csv``.

    Checks the exact columns, vendors, labels, splits, unique subject ids and (unless
    ``check_files=False``) that every ``path`` exists. The returned frame carries the
    folder in ``df.attrs["data_dir"]``.

    Raises:
        DataError: no manifest, wrong columns or values, or files listed but missing.
    """
    data_dir = Path(data_dir)
    path = data_dir / "manifest.csv"
    if not path.is_file():
        raise DataError(
            f"`{data_dir}` has no manifest.csv; prepare data with `medlora prepare "
            "acdc|mnms RAW_DIR OUT_DIR` or `medlora synth OUT_DIR` first."
        )
    try:
        df = pd.read_csv(
            path,
            dtype={"subject_id": str, "centre": str, "pathology": str, "path": str},
            keep_default_na=False,
        )
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse `{path}` as CSV ({exc}).") from exc
    if tuple(df.columns) != MANIFEST_COLUMNS:
        raise DataError(
            f"`{path}` has columns {list(df.columns)}; expected exactly "
            f"{list(MANIFEST_COLUMNS)} in this order. Rebuild it with `medlora prepare`."
        )
    bad_vendor = sorted(set(df["vendor"]) - set(VENDORS))
    if bad_vendor:
        raise DataError(
            f"`{path}` has unknown vendor(s) {bad_vendor}; allowed: {list(VENDORS)}."
        )
    labels = pd.to_numeric(df["label"], errors="coerce")
    if labels.isna().any() or not set(labels.astype(int)) <= {0, 1}:
        raise DataError(f"`{path}`: column `label` must hold only 0 and 1.")
    df["label"] = labels.astype(int)
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DataError(
            f"`{path}` has unknown split(s) {bad_split}; allowed: {list(SPLITS)}."
        )
    if df["subject_id"].duplicated().any():
        dups = sorted(df.loc[df["subject_id"].duplicated(), "subject_id"])[:5]
        raise DataError(f"`{path}` lists subject(s) {dups} more than once.")
    if check_files:
        missing = [p for p in df["path"] if not (data_dir / p).is_file()]
        if missing:
            raise DataError(
                f"the folder `{data_dir}` does not match its manifest: {len(missing)} "
                f"listed file(s) are missing, first: {missing[:5]}. Rebuild it with "
                "`medlora prepare ... --overwrite` (or restore the files)."
            )
    df.attrs["data_dir"] = str(data_dir)
    return df


# ----------------------------------------------------------------------------- writing


def _sources(info: dict) -> list[dict]:
    out = []
    for src in info.get("sources", []) or []:
        out.append({"name": src} if isinstance(src, str) else dict(src))
    return out


def _source_names(info: dict) -> list[str]:
    return sorted(str(s.get("name", "?")) for s in _sources(info))


def _preproc_key(info: dict) -> dict:
    if "preprocessing" in info:
        return info["preprocessing"]
    return {
        "image_size": info.get("image_size"),
        "spacing": info.get("spacing", info.get("target_spacing")),
    }


def _describe(info: dict, num_subjects: int | None = None) -> str:
    pre = _preproc_key(info)
    size = pre.get("image_size", info.get("image_size"))
    spacing = pre.get("target_spacing", pre.get("spacing", info.get("spacing")))
    text = f"sources {_source_names(info)}, image_size {size}, spacing {spacing}"
    n = info.get("num_subjects", num_subjects)
    if n is not None:
        text += f", {n} subjects"
    return text


_SPLIT_DEFAULTS = {
    "val_fraction": 0.15,
    "test_fraction": 0.25,
    "seed": 0,
    "client_column": "vendor",
}


def _source_content(src: dict) -> dict:
    """What defines a source's data (not where its raw download lies)."""
    out = {k: v for k, v in src.items() if k != "raw_dir"}
    if out.get("name") == "synthetic" and isinstance(out.get("config"), dict):
        from medlora_lib.data.synthetic import SynthConfig

        # a config written before a field existed had that field's default
        out["config"] = {**SynthConfig().to_dict(), **out["config"]}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _identity(info: dict) -> dict:
    """What makes two prepared data sets the same (subjects apart; see the docstring)."""
    from medlora_lib.data.preprocess import normalise_preprocessing

    split = {**_SPLIT_DEFAULTS, **(info.get("split") or {})}
    return {
        "preprocessing": normalise_preprocessing(_preproc_key(info)),
        "split": {k: split[k] for k in _SPLIT_DEFAULTS},
        "sources": sorted(
            (_source_content(s) for s in _sources(info)),
            key=lambda d: json.dumps(d, sort_keys=True),
        ),
    }


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            name = v.get("name", i) if isinstance(v, dict) else i
            out.update(_flat(v, f"{prefix}[{name}]"))
        return out
    return {prefix: tree}


def _differences(old: dict, new: dict, limit: int = 4) -> list[str]:
    """``key: old there, new here`` for what differs between two identities."""
    names_old = [str(s.get("name")) for s in old["sources"]]
    names_new = [str(s.get("name")) for s in new["sources"]]
    text = []
    if names_old != names_new:
        # other sources: their details would only repeat that
        text.append(f"sources {names_old} there, {names_new} here")
        old, new = dict(old, sources=[]), dict(new, sources=[])
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "-") != b.get(k, "-")]
    text += [
        f"{k} {a.get(k, '(none)')!r} there, {b.get(k, '(none)')!r} here" for k in keys
    ]
    if len(text) > limit:
        text = [*text[:limit], f"and {len(text) - limit} more"]
    return text


def _subject_differences(old: Sequence[str], new: Sequence[str]) -> str:
    only_old = sorted(set(old) - set(new))
    only_new = sorted(set(new) - set(old))
    parts = [f"subjects: {len(set(old))} there, {len(set(new))} here"]
    if only_old:
        parts.append(f"{len(only_old)} only there (e.g. {', '.join(only_old[:3])})")
    if only_new:
        parts.append(f"{len(only_new)} only here (e.g. {', '.join(only_new[:3])})")
    return "; ".join(parts)


def _refuse_different(
    out_dir: Path, old: dict, new: dict, what: list[str], n_new: int | None
) -> DataError:
    return DataError(
        f"`{out_dir}` already holds a different data set ({_describe(old)}); this one "
        f"has {_describe(new, n_new)}. They differ in: {'; '.join(what)}. Nothing was "
        "changed. Use `--merge` to add a new source to it (the preprocessing must "
        "match), `--overwrite` (overwrite=True) to replace it, or another folder."
    )


def _check_target(
    out_dir: Path,
    info: dict,
    overwrite: bool,
    merge: bool,
    subject_ids: Sequence[str] | None = None,
) -> tuple[dict | None, list[str] | None]:
    """Decide what to do with an existing ``out_dir``.

    Returns:
        ``(info to merge into, subject ids of the same data set rebuilt in place)``;
        the second is None unless ``out_dir`` holds this very data set, whose subjects
        the written records must then match.
    """
    if overwrite and merge:
        raise DataError("choose either overwrite or merge, not both.")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"`{out_dir}` exists and is not a folder; choose another path.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None, None
    old = read_dataset_info(out_dir)
    has_manifest = (out_dir / "manifest.csv").is_file()
    if old is None and not has_manifest:
        raise DataError(
            f"`{out_dir}` is not empty and is not a medlora data folder (no "
            "manifest.csv / dataset.json); refusing to write into it. Choose an empty "
            "or new folder."
        )
    if old is None:
        if overwrite:
            return None, None
        raise DataError(
            f"`{out_dir}` holds a manifest.csv but no dataset.json, so it cannot be "
            "checked against this data set. Use `--overwrite` to replace it or choose "
            "an empty folder."
        )
    if overwrite:
        return None, None
    from medlora_lib.data.preprocess import normalise_preprocessing

    same_pre = normalise_preprocessing(_preproc_key(old)) == normalise_preprocessing(
        _preproc_key(info)
    )
    if merge:
        if not same_pre:
            raise DataError(
                f"cannot merge into `{out_dir}`: it holds a data set with "
                f"{_describe(old)} prepared with different preprocessing parameters "
                f"({_preproc_key(old)} vs {_preproc_key(info)}). Use the same profile / "
                "spacing / image size, `--overwrite`, or an empty folder."
            )
        clash = sorted(set(_source_names(old)) & set(_source_names(info)))
        if clash:
            raise DataError(
                f"cannot merge into `{out_dir}`: source(s) {clash} are already in it "
                f"({_describe(old)}). Use `--overwrite` to rebuild, or merge a new source."
            )
        return old, None
    what = _differences(_identity(old), _identity(info))
    try:
        old_ids = read_manifest(out_dir, check_files=False)["subject_id"].tolist()
    except DataError:
        old_ids = None  # an unreadable manifest: only --overwrite can replace it
        what.append("manifest.csv unreadable there")
    n_new = None if subject_ids is None else len(set(subject_ids))
    if old_ids is not None and subject_ids is not None:
        if set(old_ids) != set(subject_ids):
            what.append(_subject_differences(old_ids, subject_ids))
    if what:
        raise _refuse_different(out_dir, old, info, what, n_new)
    return None, old_ids  # the same data set: rebuilt in place


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_WORK_NAME = re.compile(r"^(tmp|old)-(.+)-(\d+)-[0-9a-f]{8}$")


def _work_dir(out_dir: Path, kind: str) -> Path:
    """A hidden sibling of ``out_dir`` that names its owner (host and pid)."""
    tag = uuid.uuid4().hex[:8]
    return out_dir.parent / f".{out_dir.name}.{kind}-{_HOST}-{os.getpid()}-{tag}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_work_dirs(out_dir: str | Path) -> list[Path]:
    """Remove what a killed writer of ``out_dir`` left beside it; return what it removed.

    Only ``.OUT_DIR.tmp-*`` / ``.OUT_DIR.old-*`` folders of this host whose process is
    gone are touched. A left-over ``.old-*`` (the previous data set, moved aside just
    before the kill) is moved back to ``OUT_DIR`` when ``OUT_DIR`` is missing. Each
    action is reported on stderr.
    """
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        return []
    prefix = f".{out_dir.name}."
    stale: list[tuple[str, Path, int]] = []
    for entry in sorted(out_dir.parent.iterdir()):
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        m = _WORK_NAME.match(entry.name[len(prefix) :])
        if m is None or m.group(2) != _HOST or _process_alive(int(m.group(3))):
            continue
        stale.append((m.group(1), entry, int(m.group(3))))
    removed = []
    for kind, path, pid in sorted(stale, key=lambda t: t[0] != "old"):
        if kind == "old" and not out_dir.exists():
            os.replace(path, out_dir)
            print(
                f"note: put back `{out_dir}` from `{path.name}`: a write of it by "
                f"process {pid} was killed while swapping folders",
                file=sys.stderr,
            )
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(
            f"note: removed `{path}`, left by an interrupted write of `{out_dir}` "
            f"(process {pid} is gone)",
            file=sys.stderr,
        )
    return removed


def write_prepared_dataset(
    out_dir: str | Path,
    records: Iterable[PreparedRecord],
    dataset_info: dict,
    overwrite: bool = False,
    merge: bool = False,
    *,
    allow_single_class: bool = True,
    subject_ids: Sequence[str] | None = None,
) -> Path:
    """Write a prepared data folder atomically (see the module docstring).

    Args:
        out_dir: the target folder ``OUT_DIR``.
        records: the subjects (any iterable, e.g. a generator that preprocesses lazily:
            arrays are written as they come, so memory stays small).
        dataset_info: description saved as ``dataset.json``: ``preprocessing`` (see
            :func:`medlora_lib.data.preprocess.preprocessing_params`) or ``image_size`` /
            ``spacing``; ``sources`` (list of names or dicts with ``name``); ``split``
            ``{val_fraction, test_fraction, seed[, client_column]}``; any other keys are
            kept as they are.
        overwrite: replace a different data set already in ``out_dir``.
        merge: add these records to the data set in ``out_dir`` (same preprocessing,
            new sources); splits are recomputed over the merged manifest.
        allow_single_class: passed to :func:`assign_splits`: True (default) writes a
            single-class client with a warning, False refuses it.
        subject_ids: the ids the records will have, when known before they are made
            (the loaders scan first): a different data set in ``out_dir`` is then
            refused before any preprocessing. Without it the ids are compared once the
            records are written (and the new folder dropped if they differ).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: ``out_dir`` holds something else, a record is invalid, subject ids
            collide, or splitting fails. Nothing is left half-written.
    """
    out_dir = Path(out_dir).absolute()
    info = dict(dataset_info)
    info["sources"] = _sources(info)
    split_cfg = {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 0}
    split_cfg.update(info.get("split") or {})
    split_cfg.setdefault("client_column", "vendor")
    info["split"] = split_cfg
    clean_stale_work_dirs(out_dir)
    old_info, same_ids = _check_target(out_dir, info, overwrite, merge, subject_ids)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_dir(out_dir, "tmp")
    backup = _work_dir(out_dir, "old")
    try:
        (tmp / "arrays").mkdir(parents=True)
        rows: list[dict] = []
        if old_info is not None:
            old_df = read_manifest(out_dir)
            for row in old_df.to_dict("records"):
                dst = tmp / "arrays" / f"{row['subject_id']}.npz"
                _link_or_copy(out_dir / row["path"], dst)
                row["path"] = f"arrays/{dst.name}"
                rows.append(row)
        seen = {r["subject_id"] for r in rows}
        shape = None
        for rec in records:
            _validate_record(rec, shape)
            shape = rec.image.shape
            if rec.subject_id in seen:
                raise DataError(
                    f"subject id {rec.subject_id!r} appears twice (or is already in "
                    f"`{out_dir}`); subject ids must be unique across sources."
                )
            seen.add(rec.subject_id)
            rel = f"arrays/{rec.subject_id}.npz"
            np.savez_compressed(
                tmp / rel,
                image=rec.image.astype(np.float32, copy=False),
                label=rec.seg.astype(np.uint8, copy=False),
            )
            rows.append(
                {
                    "subject_id": rec.subject_id,
                    "dataset": rec.dataset,
                    "vendor": normalise_vendor(rec.vendor),
                    "centre": str(rec.centre),
                    "pathology": str(rec.pathology),
                    "label": int(rec.label),
                    "split": "train",
                    "path": rel,
                }
            )
        if not rows:
            raise DataError("no subjects to write: the source produced no records.")
        if same_ids is not None and set(same_ids) != seen:
            raise _refuse_different(
                out_dir,
                read_dataset_info(out_dir) or {},
                info,
                [_subject_differences(same_ids, sorted(seen))],
                len(seen),
            )
        df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
        df = assign_splits(
            df,
            val_fraction=float(split_cfg["val_fraction"]),
            test_fraction=float(split_cfg["test_fraction"]),
            seed=int(split_cfg["seed"]),
            client_column=str(split_cfg["client_column"]),
            allow_single_class=allow_single_class,
        )
        df = df.sort_values("subject_id", kind="stable").reset_index(drop=True)
        if old_info is not None:
            info["sources"] = _sources(old_info) + info["sources"]
        info["num_subjects"] = int(len(df))
        info["counts"] = {
            v: {
                "n": int((df["vendor"] == v).sum()),
                "healthy": int(((df["vendor"] == v) & (df["label"] == 0)).sum()),
            }
            for v in VENDORS
        }
        df.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "dataset.json").write_text(
            json.dumps(info, indent=2, default=str) + "\n"
        )
        # swap in: the old folder (if any) is moved aside first, then removed
        if out_dir.exists():
            os.replace(out_dir, backup)
        os.replace(tmp, out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not out_dir.exists():
            os.replace(backup, out_dir)
        raise
    return out_dir


def _validate_record(rec: PreparedRecord, shape: tuple | None) -> None:
    img, seg = np.asarray(rec.image), np.asarray(rec.seg)
    if img.ndim != 4 or img.shape[0] != 2 or seg.shape != img.shape:
        raise DataError(
            f"record {rec.subject_id!r}: image {img.shape} / label {seg.shape} must both "
            "be (2, H, W, D)."
        )
    if shape is not None and img.shape != shape:
        raise DataError(
            f"record {rec.subject_id!r} has shape {img.shape}, the others {shape}; all "
            "subjects of a data folder must share one image size."
        )
    if int(rec.label) not in (0, 1):
        raise DataError(f"record {rec.subject_id!r}: label must be 0 or 1.")
