"""Training linear probes after a run (the ``probe`` metric's arithmetic): per site, features
standardised with the training items' mean and (population) deviation, then a logistic
regression by full-batch L-BFGS in float64 minimising the mean cross-entropy + l2 / 2 * |W|^2
(the bias unpenalised; two classes: one weight vector and a sigmoid, as scikit-learn fits
them). Deterministic: the same items give the same weights bit for bit on one machine. The
weights are returned for the raw activations (divided by the deviation, the bias shifted by
the mean)."""

from __future__ import annotations

import math

import torch

__all__ = ["train_probes"]


def train_probes(
    per_site: list[torch.Tensor],
    *,
    labels: list[int],
    n_classes: int,
    split: tuple[list[int], list[int]],
    l2: float,
    max_iter: int,
) -> dict[str, torch.Tensor]:
    """``accuracy``, ``auroc`` (NaN unless two classes) and ``train_accuracy`` [sites],
    ``weight`` [sites, outputs, d] and ``bias`` [sites, outputs] (float32, CPU); ``per_site``:
    each site's [items, d] values."""
    train, test = (torch.tensor(part) for part in split)
    y = torch.tensor(labels)
    out: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(False), torch.enable_grad():
        for values in per_site:
            x = values.detach().cpu().to(torch.float64).clone()
            fitted = _fit(x, y, train, n_classes, l2, max_iter)
            for key, value in fitted.items():
                out.setdefault(key, []).append(value)
            scores = x[test] @ fitted["weight"].T + fitted["bias"]
            out.setdefault("accuracy", []).append(_accuracy(scores, y[test]))
            out.setdefault("auroc", []).append(_auroc(scores, y[test], n_classes))
            train_scores = x[train] @ fitted["weight"].T + fitted["bias"]
            out.setdefault("train_accuracy", []).append(_accuracy(train_scores, y[train]))
    return {key: torch.stack(values).float() for key, values in out.items()}


def _fit(
    x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, n_classes: int, l2: float, max_iter: int
) -> dict[str, torch.Tensor]:
    """One probe: weights and bias for the raw features ``x``."""
    features = x[train]
    mean = features.mean(0)
    std = features.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (features - mean) / std
    target = y[train]
    outputs = 1 if n_classes == 2 else n_classes
    weight = torch.zeros(outputs, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-8,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ weight.T + bias
        if outputs == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], target.to(torch.float64)
            )
        else:
            loss = torch.nn.functional.cross_entropy(logits, target)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    w = weight.detach() / std
    b = bias.detach() - (weight.detach() * (mean / std)).sum(-1)
    return {"weight": w, "bias": b}


def _predicted(scores: torch.Tensor) -> torch.Tensor:
    return (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(-1)


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (_predicted(scores) == y).to(torch.float64).mean()


def _auroc(scores: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The area under the ROC curve of the last class's score (ties count half; NaN unless
    two classes are present among the items)."""
    if n_classes != 2 or scores.shape[1] != 1:
        return torch.tensor(math.nan, dtype=torch.float64)
    positive, negative = scores[y == 1, 0], scores[y == 0, 0]
    if len(positive) == 0 or len(negative) == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    above = (positive[:, None] > negative[None, :]).to(torch.float64)
    ties = (positive[:, None] == negative[None, :]).to(torch.float64)
    return (above + 0.5 * ties).mean()
