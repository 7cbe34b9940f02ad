"""Labels for the attacks: given by default (as in the paper), optionally recovered from g.

Recovery reads the gradient of the last fully connected layer, W (K classes, F features), of the
mean cross-entropy over the batch: dL/dW_k = (1/B) sum_j (p_jk - y_jk) h_j, with p_j the softmax,
y_j the one-hot label and h_j >= 0 the (post-ReLU) features of image j.

* ``idlg`` (Zhao et al. 2020, B = 1): p_k - y_k < 0 only for the true class, so its gradient row
  is the only one with a negative sum (and, with a bias, the only negative bias gradient).
* ``yin`` (Yin et al. 2021, eq. 5, unique labels): a class present in the batch gets strongly
  negative entries from its own images; take the B classes with the most negative row minima.
* ``count`` (repeated labels; the bias-gradient counting of Geng et al. 2021, "Towards general
  deep leakage in federated learning", Sec. 3.2): the bias gradient is exactly
  dL/db_k = (1/B) sum_j (p_jk - y_jk), so the number of images of class k is
  n_k = sum_j p_jk - B dL/db_k. The attacker estimates sum_j p_jk as B p̂_k with p̂ the victim's
  mean softmax (uniform 1/K by default: an untrained victim's logits are near 0) and hands out
  the B images one at a time to the class with the most left. Exact when p̂ is.

Recovered labels are a *set*: the gradient of a mean is invariant to the order of the batch, so
they come sorted ascending, and the orchestration matches reconstructions to the ground truth
(Hungarian) when positions matter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from gi_core.errors import ConfigError

LabelMethod = Literal["idlg", "yin", "count"]


def recover_labels(
    last_weight_grad: Tensor,
    *,
    batch_size: int,
    method: LabelMethod,
    last_bias_grad: Tensor | None = None,
) -> Tensor:
    """Labels (B,) int64, sorted ascending, from the last layer's gradient (K, F) [and (K,)]."""
    if last_weight_grad.ndim != 2:
        raise ConfigError(f"last_weight_grad must be (K, F), got {tuple(last_weight_grad.shape)}")
    num_classes = last_weight_grad.shape[0]
    if not 1 <= batch_size <= num_classes:
        raise ConfigError(
            f"batch_size={batch_size}: unique-label recovery needs 1 <= B <= K={num_classes}"
        )
    if method == "idlg":
        return _idlg(last_weight_grad, batch_size=batch_size, last_bias_grad=last_bias_grad)
    if method == "yin":
        return _yin(last_weight_grad, batch_size=batch_size)
    raise ConfigError(f"unknown label recovery method {method!r}; known: idlg, yin")


def _idlg(weight_grad: Tensor, *, batch_size: int, last_bias_grad: Tensor | None) -> Tensor:
    if batch_size != 1:
        raise ConfigError(f"method 'idlg' needs batch_size=1 (got {batch_size}); use 'yin'")
    # The bias gradient is p - y itself (exact); without a bias, the row sum is (p_k - y_k)*sum(h).
    score = last_bias_grad if last_bias_grad is not None else weight_grad.sum(dim=1)  # (K,)
    return score.detach().argmin().reshape(1).to(torch.int64)


def _yin(weight_grad: Tensor, *, batch_size: int) -> Tensor:
    row_min = weight_grad.detach().amin(dim=1)  # (K,) most negative entry of each class's row
    chosen = torch.argsort(row_min)[:batch_size]  # the B most negative rows
    return torch.sort(chosen).values.to(torch.int64)


def recover_label_counts(
    last_bias_grad: Tensor, *, batch_size: int, mean_probs: Tensor | None = None
) -> Tensor:
    """Labels (B,) int64 sorted ascending, repeats allowed, from the last layer's bias gradient
    (K,) and the estimated mean softmax p̂ (K,) (uniform when None). See ``count`` above."""
    k = last_bias_grad.shape[0]
    probs = torch.full((k,), 1.0 / k) if mean_probs is None else mean_probs.detach().cpu()
    counts = batch_size * (probs.double() - last_bias_grad.detach().cpu().double())  # (K,)
    # B images, one at a time, to the class with the most still unassigned: integer counts
    # summing to B, equal to round(counts) whenever the estimate is close.
    remaining, chosen = counts.clone(), []
    for _ in range(batch_size):
        c = int(torch.argmax(remaining))
        chosen.append(c)
        remaining[c] -= 1.0
    return torch.sort(torch.tensor(chosen, dtype=torch.int64)).values


def label_accuracy(recovered: Tensor, true: Tensor) -> float:
    """Fraction of the true labels recovered, order-free: |multiset intersection| / len(true)."""
    if true.numel() == 0:
        raise ConfigError("label_accuracy needs at least one true label")
    found = Counter(recovered.flatten().tolist())
    wanted = Counter(true.flatten().tolist())
    return sum((found & wanted).values()) / true.numel()


def last_layer_gradient(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """The final linear layer's (weight (K, F), bias (K,) or None) in a gradient list in
    parameter order (torchvision ResNets and this project's victims end with their classifier)."""
    if len(grads) >= 2 and grads[-1].ndim == 1 and grads[-2].ndim == 2:
        if grads[-2].shape[0] == grads[-1].shape[0]:
            return grads[-2], grads[-1]
    if grads and grads[-1].ndim == 2:
        return grads[-1], None
    raise ConfigError("labels: the victim does not end with a linear layer; use labels: given")


def attack_labels(grads: Sequence[Tensor], true: Tensor, *, mode: str) -> tuple[Tensor, float]:
    """Labels the attacker uses and their accuracy: `given` returns the true labels (1.0)."""
    if mode == "given":
        return true, 1.0
    weight, bias = last_layer_gradient(grads)
    if mode == "count":
        if bias is None:
            raise ConfigError("labels: count needs a victim whose last linear layer has a bias")
        counted = recover_label_counts(bias, batch_size=len(true))
        return counted.to(true.device), label_accuracy(counted, true)
    method: LabelMethod = "idlg" if mode == "idlg" else "yin"
    recovered = recover_labels(weight, batch_size=len(true), method=method, last_bias_grad=bias)
    return recovered.to(true.device), label_accuracy(recovered, true)
