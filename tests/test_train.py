"""The shared training loop on a toy problem: it learns, selects, and is deterministic."""

from __future__ import annotations

import torch
from torch import nn

from medlora_lib.config import TrainConfig
from medlora_lib.train import class_weights, evaluate, fit


def _toy(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.8).long()  # imbalanced: ~25 % positives
    return {"x": x}, y


def _run(seed):
    torch.manual_seed(seed)
    model = nn.Linear(5, 2)
    cfg = TrainConfig(lr=0.05, batch_size=32, label_smoothing=0.0)
    train, val = _toy(200, 1), _toy(100, 2)
    res = fit(lambda b: model(b["x"]), model, train, val, cfg, epochs=8, seed=seed)
    return model, res, val


def test_fit_learns_and_selects_best_epoch():
    model, res, val = _run(0)
    m = evaluate(lambda b: model(b["x"]), val[0], val[1])
    assert m["balanced_accuracy"] > 0.85
    best = max(r["val_balanced_accuracy"] for r in res.history)
    assert res.best_score == best
    assert m["balanced_accuracy"] == best  # the restored parameters are the best ones


def test_fit_is_deterministic():
    m1, _, _ = _run(3)
    m2, _, _ = _run(3)
    assert torch.equal(m1.weight, m2.weight)


def test_class_weights_balance_counts():
    w = class_weights(torch.tensor([0, 1, 1, 1]))
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3]))
    assert torch.allclose(class_weights(torch.tensor([1, 1])), torch.tensor([1.0, 1.0]))
