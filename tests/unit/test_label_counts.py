"""Recovery of repeated labels (issue 19): exact on a constructed case, and usable on a real
untrained victim."""

from __future__ import annotations

import torch

from gi_core.datasets import batch_indices, load_images
from gi_core.gradients import client_gradient
from gi_core.labels import attack_labels, last_layer_gradient, recover_label_counts
from gi_core.victims import build_victim


def _victim(classes: int, *, zero_head: bool) -> torch.nn.Module:
    model = build_victim("convnet", num_classes=classes, image_size=32, width=4, seed=0)
    if zero_head:  # logits 0 for every input: the softmax is exactly uniform, p̂ = 1/K holds
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return model


def _images(batch: int) -> torch.Tensor:
    idx = batch_indices("lfw-faces", batch_size=batch, batch_index=0, image_size=32)
    return load_images("lfw-faces", idx, image_size=32)[0]


def test_repeated_labels_are_recovered_exactly_when_the_softmax_is_known():
    labels = torch.tensor([3, 3, 3, 0, 5, 5, 1, 3])
    model = _victim(7, zero_head=True)
    _, bias = last_layer_gradient(client_gradient(model, _images(8), labels))
    assert bias is not None
    recovered = recover_label_counts(bias, batch_size=8)
    assert recovered.tolist() == sorted(labels.tolist())


def test_yin_cannot_count_repeats_but_count_can():
    labels = torch.tensor([2, 2, 2, 2])
    model = _victim(5, zero_head=True)
    grads = client_gradient(model, _images(4), labels)
    _, yin_accuracy = attack_labels(grads, labels, mode="yin")
    counted, count_accuracy = attack_labels(grads, labels, mode="count")
    assert count_accuracy == 1.0 and counted.tolist() == [2, 2, 2, 2]
    assert yin_accuracy == 0.25  # unique-label recovery finds the class once


def test_count_on_an_untrained_victim_recovers_most_repeated_labels():
    labels = torch.tensor([1, 1, 4, 4, 4, 0, 2, 2])
    model = _victim(6, zero_head=False)
    _, accuracy = attack_labels(client_gradient(model, _images(8), labels), labels, mode="count")
    assert accuracy >= 0.75
