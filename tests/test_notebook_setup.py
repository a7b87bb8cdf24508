"""The common opening of the chapters (medlora_lib.notebook)."""

from __future__ import annotations

import warnings

from medlora_lib.config import get_config
from medlora_lib.notebook import KNOWN_NOISE, describe_profile, setup


def test_setup_prints_versions_and_silences_only_the_known_noise(capsys):
    info = setup(("medlora", "torch", "no-such-package"))
    out = capsys.readouterr().out
    assert info["versions"]["no-such-package"] == "not installed"
    assert "medlora" in out and "torch threads" in out and info["cache"] in out
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        setup(quiet=True)
        for message in KNOWN_NOISE:
            warnings.warn(message, stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_describe_profile_prints_the_config_that_runs(capsys):
    cfg = get_config("smoke", overrides={"fed.num_rounds": 3, "adapter.lora_rank": 2})
    key = describe_profile(cfg, seeds=[0, 1])
    out = capsys.readouterr().out
    assert key["profile"] == "smoke" and "3 rounds" in key["budget"]
    assert "rank 2" in key["LoRA"] and "param seeds" in out and "[0, 1]" in out
    assert describe_profile("cpu")["profile"] == "cpu"


def test_describe_profile_names_the_fine_tuning_recipe():
    paper = describe_profile("paper")
    assert (
        "warm-up + cosine" in paper["recipe"] and "layer decay 0.75" in paper["recipe"]
    )
    assert "augmentation" in paper["recipe"] and "no prefix cache" in paper["recipe"]
    assert "early stop after 5" in paper["selection"]
    cpu = describe_profile("cpu")
    assert "constant lr" in cpu["recipe"] and "no augmentation" in cpu["recipe"]


def test_the_parameters_cells_hold_the_cpu_profile_and_paper_passes_its_own():
    from medlora_lib.bookrun import (
        PROFILE_PARAMETERS,
        cell_timeout,
        list_notebooks,
        notebook_parameters,
        parameter_names,
    )

    cpu, paper = get_config("cpu"), get_config("paper")
    seen = set()
    for nb in list_notebooks():
        names = parameter_names(nb)
        assert "profile" in names, nb.name
        literal = _parameters_cell_values(nb)
        assert literal["profile"] == "cpu", nb.name
        got = notebook_parameters(nb, "paper")
        assert got["profile"] == "paper"
        for name, (section, field) in PROFILE_PARAMETERS.items():
            if name not in names:
                continue
            seen.add(name)
            # the cell's literal is the cpu profile's value ...
            assert literal[name] == getattr(getattr(cpu, section), field), nb.name
            # ... and --profile paper passes the paper profile's value
            assert got[name] == getattr(getattr(paper, section), field), nb.name
        assert notebook_parameters(nb, "cpu") == {}
    assert seen == set(PROFILE_PARAMETERS)
    assert get_config("paper").fed.num_rounds == 30
    assert cell_timeout("paper") is None and cell_timeout("cpu") == 3600


def _parameters_cell_values(nb) -> dict:
    from medlora_lib.bookrun import parameter_defaults

    values = parameter_defaults(nb)
    assert values, f"{nb.name} has no parameters cell"
    return values


def test_papermill_reads_every_parameter_with_its_help(caplog):
    """papermill's own inspector (``papermill --help-notebook``, and the ``Unable to
    parse line`` warning of every run) skips a parameter line holding a second ``=``,
    e.g. in its comment: every name of the cell must come back, with its help text."""
    import logging

    from papermill.inspection import inspect_notebook

    from medlora_lib.bookrun import list_notebooks, parameter_names

    for nb in list_notebooks():
        with caplog.at_level(logging.WARNING, logger="papermill"):
            caplog.clear()
            got = inspect_notebook(str(nb))
        assert not [r for r in caplog.records if "Unable to parse" in r.message], nb
        assert set(got) == set(parameter_names(nb)), nb.name
