"""imagenet:/ffhq: on folders built here from real images shipped in scikit-image."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gi_core.datasets import dataset_info, load_images
from gi_core.errors import ConfigError

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # (512, 512), (400, 600), (300, 451), ...


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _expected_imagenet(array: np.ndarray, size: int) -> torch.Tensor:
    # reference: Resize(shorter side -> 72/64 * S) then the central S x S crop, by hand
    from torchvision.transforms.v2 import functional as TF

    image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    resized = TF.resize(image, round(size * 72 / 64), antialias=True)
    h, w = resized.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return resized[:, top : top + size, left : left + size].clamp(0, 1)


def test_imagenet_val_layout_labels_and_crop(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    # two classes (wnid folders), two images each, one of them landscape (400 x 600)
    layout = {"n01440764": ("coffee", "astronaut"), "n01443537": ("chelsea", "rocket")}
    for wnid, names in layout.items():
        for name in names:
            _save(_photo(name), root / "val" / wnid / f"ILSVRC2012_val_{name}.JPEG".lower())
    info = dataset_info(f"imagenet:{root}", image_size=64)
    assert (info.num_samples, info.num_classes) == (4, 2)
    images, labels = load_images(f"imagenet:{root}", [0, 1, 2, 3], image_size=64)
    assert images.shape == (4, 3, 64, 64) and labels.tolist() == [0, 0, 1, 1]
    # files sort within a class: astronaut before coffee
    decoded = np.asarray(Image.open(next((root / "val" / "n01440764").glob("*coffee*"))))
    torch.testing.assert_close(images[1], _expected_imagenet(decoded, 64), atol=1e-5, rtol=0)
    # 32 px uses the same ratio: Resize(36) + CenterCrop(32)
    small, _ = load_images(f"imagenet:{root}", [1], image_size=32)
    torch.testing.assert_close(small[0], _expected_imagenet(decoded, 32), atol=1e-5, rtol=0)
    # the centre crop of a landscape photo drops its sides: not the squashed whole photo
    squashed = torch.nn.functional.interpolate(
        torch.from_numpy(decoded).permute(2, 0, 1)[None].float() / 255, size=(64, 64)
    )[0]
    assert float((images[1] - squashed).abs().mean()) > 0.02


def test_imagenet_given_the_val_folder_itself(tmp_path: Path) -> None:
    for wnid, name in (("n1", "coffee"), ("n2", "chelsea")):
        _save(_photo(name), tmp_path / "val" / wnid / f"{name}.png")
    assert dataset_info(f"imagenet:{tmp_path / 'val'}", image_size=32).num_classes == 2


def test_one_folder_mistakes_are_refused(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for name in PHOTOS:
        _save(_photo(name), flat / "val" / f"{name}.JPEG")
    with pytest.raises(ConfigError, match="directly in .*one folder per class"):
        dataset_info(f"imagenet:{flat}", image_size=64)
    one = tmp_path / "one"
    for name in PHOTOS:
        _save(_photo(name), one / "val" / "n0" / f"{name}.JPEG")
    with pytest.raises(ConfigError, match="1 class"):
        dataset_info(f"imagenet:{one}", image_size=64)
    faces = tmp_path / "ffhq"
    for i, name in enumerate(PHOTOS):
        _save(_photo(name), faces / f"{i:05d}.png")
    with pytest.raises(ConfigError, match="no labels.*ffhq-features.*labels.csv"):
        dataset_info(f"ffhq:{faces}", image_size=64)


def _ffhq(root: Path, ages: dict[int, float | None]) -> None:
    from skimage.data import lfw_subset

    faces = (lfw_subset()[:10] * 255).astype(np.uint8)  # real faces, gray 25 x 25
    for n, age in ages.items():
        face = np.repeat(faces[n][:, :, None], 3, axis=2)
        big = np.asarray(Image.fromarray(face).resize((128, 128)))  # FFHQ thumbnails are 128 px
        _save(big, root / "images" / f"{n // 1000 * 1000:05d}" / f"{n:05d}.png")
        annotation = [] if age is None else [{"faceAttributes": {"age": age, "gender": "female"}}]
        path = root / "ffhq-features" / f"{n:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(annotation))


def test_ffhq_age_labels_from_ffhq_features(tmp_path: Path) -> None:
    _ffhq(tmp_path, {0: 34.0, 1: 7.5, 2: 38.9, 3: None, 4: 61.0, 5: 20.0})
    info = dataset_info(f"ffhq:{tmp_path}", image_size=32)
    assert info.num_samples == 5  # image 3 has no face annotation: skipped
    images, labels = load_images(f"ffhq:{tmp_path}", range(5), image_size=32)
    assert labels.tolist() == [3, 0, 3, 6, 2]  # age // 10, as the official code
    assert images.shape == (5, 3, 32, 32)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert info.num_classes == 7


def test_ffhq_labels_csv_wins_and_is_checked(tmp_path: Path) -> None:
    _ffhq(tmp_path, {0: 34.0, 1: 7.5, 2: 50.0})
    (tmp_path / "labels.csv").write_text(
        "file,label\n00000/00000.png,1\n00000/00002.png,0\n00000/00001.png,1\n"
    )
    images, labels = load_images(f"ffhq:{tmp_path}", [0, 1, 2], image_size=32)
    assert labels.tolist() == [1, 0, 1]
    (tmp_path / "labels.csv").write_text("file,label\n00000/00000.png,old\n")
    from gi_core import datasets

    datasets._source.cache_clear()
    with pytest.raises(ConfigError, match="line 2: label must be an integer"):
        dataset_info(f"ffhq:{tmp_path}", image_size=32)
