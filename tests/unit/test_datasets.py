"""Unit tests for gi_core.datasets: shipped images, deterministic disjoint batches, errors."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gi_core import datasets
from gi_core.errors import ConfigError

BUILTIN = {"lfw-faces": (100, 100), "natural-photos": (176, 11), "synthetic": (64, 10)}


def _clear_caches() -> None:
    for fn in (
        datasets._source,
        datasets._batch_plan,
        datasets._lfw_images,
        datasets._photo_images,
        datasets._synthetic_images,
    ):
        fn.cache_clear()


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("size", [32, 64])
def test_builtin_shapes_and_ranges(name: str, size: int) -> None:
    info = datasets.dataset_info(name, image_size=size)
    assert (info.num_samples, info.num_classes, info.channels) == BUILTIN[name] + (3,)
    x, y = datasets.load_images(name, range(info.num_samples), image_size=size)
    assert x.shape == (info.num_samples, 3, size, size) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(info.num_classes))


def test_lfw_faces_are_gray_and_distinct() -> None:
    x, y = datasets.load_images("lfw-faces", [0, 1], image_size=32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert y.tolist() == [0, 1] and not torch.allclose(x[0], x[1])


def test_loading_is_deterministic_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    first = {n: datasets.load_images(n, [0, 5, 17], image_size=32) for n in BUILTIN}
    _clear_caches()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name, (x, y) in first.items():
        x2, y2 = datasets.load_images(name, [0, 5, 17], image_size=32)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_returned_images_do_not_alias_the_cache() -> None:
    x, _ = datasets.load_images("synthetic", [0], image_size=32)
    x.zero_()
    again, _ = datasets.load_images("synthetic", [0], image_size=32)
    assert float(again.abs().sum()) > 0


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("batch_size", [1, 4, 8, 16, 32])
def test_batches_are_disjoint_and_label_unique(name: str, batch_size: int) -> None:
    n, num_classes = BUILTIN[name]
    count = datasets.max_batches(name, batch_size=batch_size, image_size=32)
    assert count >= 1
    seen: set[int] = set()
    for b in range(count):
        idx = datasets.batch_indices(name, batch_size=batch_size, batch_index=b, image_size=32)
        assert len(idx) == batch_size and seen.isdisjoint(idx)
        seen.update(idx)
        labels = datasets.load_images(name, idx, image_size=32)[1].tolist()
        most = max(Counter(labels).values())
        assert most == 1 if batch_size <= num_classes else most <= -(-batch_size // num_classes)
    assert len(seen) > n - batch_size - num_classes  # greedy leaves little unused


def test_batch_indices_are_deterministic() -> None:
    before = datasets.batch_indices("natural-photos", batch_size=8, batch_index=3, image_size=32)
    _clear_caches()
    after = datasets.batch_indices("natural-photos", batch_size=8, batch_index=3, image_size=64)
    assert before == after


def test_too_many_batches_raises() -> None:
    count = datasets.max_batches("lfw-faces", batch_size=32, image_size=32)
    assert count == 3
    with pytest.raises(ConfigError, match="batch_size=32"):
        datasets.batch_indices("lfw-faces", batch_size=32, batch_index=count, image_size=32)


def test_plan_with_unequal_classes_keeps_labels_unique() -> None:
    # class 0 has 5 samples, classes 1 and 2 one each: only 2 label-unique pairs exist
    plan = datasets._plan_batches([0, 0, 0, 0, 0, 1, 2], 2)
    assert plan == ((0, 5), (1, 6))


def test_unknown_and_incomplete_names_raise() -> None:
    with pytest.raises(ConfigError, match="lfw-faces"):
        datasets.dataset_info("mnist", image_size=32)
    with pytest.raises(ConfigError, match="needs a path"):
        datasets.dataset_info("imagefolder", image_size=32)
    with pytest.raises(ConfigError, match="download"):
        datasets.dataset_info("cifar10:/nonexistent/cifar", image_size=32)
    with pytest.raises(ConfigError, match="image_size"):
        datasets.dataset_info("synthetic", image_size=4)
    with pytest.raises(ConfigError, match="out of range"):
        datasets.load_images("synthetic", [64], image_size=32)


def test_available_datasets_lists_builtin_and_path_kinds() -> None:
    names = datasets.available_datasets()
    assert set(BUILTIN) <= set(names) and "imagefolder:<path>" in names


def test_imagefolder_center_crops(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            img = np.zeros((20, 40, 3), dtype=np.uint8)  # wide: black side bands
            img[:, 10:30] = 255  # the centre 20x20 square is white
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    name = f"imagefolder:{tmp_path}"
    info = datasets.dataset_info(name, image_size=16)
    assert (info.num_samples, info.num_classes) == (6, 2)
    x, y = datasets.load_images(name, [0, 5], image_size=16)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert torch.allclose(x, torch.ones_like(x))
    assert datasets.batch_indices(name, batch_size=2, batch_index=2, image_size=16) == [2, 5]
