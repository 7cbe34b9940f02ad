"""ImageNet and FFHQ prepared as the paper's official code prepares them (`imagenet:<root>`,
`ffhq:<root>`; dispatched from gi_core.datasets, which owns decoding and the class checks).

imagenet:<root>
    The ILSVRC-2012 *validation* split sorted into one folder per class (``<root>/val/<wnid>/
    *.JPEG``, as torchvision's ImageNet / the common ``valprep.sh`` leave it; ``<root>`` may
    also be the ``val`` folder itself). Label = index of the sorted class folder. Preprocessing
    (torchvision transforms v2): Resize(round(72/64 * S)) of the shorter side, then
    CenterCrop(S): at S = 64 the official Resize(72) + CenterCrop(64), the same ratio at other
    sizes.
ffhq:<root>
    FFHQ images (``<root>/images/`` or ``<root>`` itself, flat or in the official thousands
    sub-folders, named by image number ``00000.png``...). Labels, as in the official code,
    ``age // 10`` from the ffhq-features-dataset annotations: ``<root>/ffhq-features/<n>.json``
    (the repository's ``json/`` folder, one JSON list per image with
    ``[0]["faceAttributes"]["age"]``). Images without a face annotation are skipped. Or a
    ``<root>/labels.csv`` with a header ``file,label`` (file relative to the image folder,
    integer label >= 0), which wins when both exist. Preprocessing: Resize(S) (FFHQ is square).

Both return (B, 3, S, S) float32 in [0, 1].
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from gi_core.errors import ConfigError

IMAGENET_RESIZE, IMAGENET_CROP = 72, 64  # the official code's Resize(72) + CenterCrop(64)
FEATURES_DIR, LABELS_CSV = "ffhq-features", "labels.csv"
Loader = Callable[[Sequence[int], int], Tensor]


def imagenet_transform(image_size: int) -> Callable[[Tensor], Tensor]:
    """(3, H, W) in [0, 1] -> (3, S, S): Resize(round(72/64 S)) + CenterCrop(S), transforms v2."""
    from torchvision.transforms import v2

    resize = round(image_size * IMAGENET_RESIZE / IMAGENET_CROP)
    pipeline = v2.Compose(
        [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), v2.ToDtype(torch.float32)]
    )
    return lambda image: pipeline(image).clamp(0.0, 1.0)


def ffhq_transform(image_size: int) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.Resize((image_size, image_size), antialias=True)])
    return lambda image: pipeline(image).clamp(0.0, 1.0)


def _image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
    )


def imagenet_files(root: str, extensions: Sequence[str]) -> tuple[list[Path], list[int], int]:
    """(files, labels, number of classes) of the validation split under `root`."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"imagenet:{root}: no such directory")
    folder = base / "val" if (base / "val").is_dir() else base
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in extensions]
    if loose and not classes:
        raise ConfigError(
            f"imagenet:{root}: the {len(loose)} images lie directly in {folder}, so there are "
            "no labels. Sort the validation split into one folder per class (<root>/val/<wnid>/"
            "*.JPEG, e.g. with the valprep.sh script or torchvision.datasets.ImageNet)"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(folder / name, extensions)
        files += found
        labels += [label] * len(found)
    return files, labels, len(classes)


def ffhq_files(root: str, extensions: Sequence[str]) -> tuple[list[Path], list[int], int]:
    """(files, labels, number of classes) of FFHQ under `root` with age // 10 or CSV labels."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"ffhq:{root}: no such directory")
    folder = base / "images" if (base / "images").is_dir() else base
    if (base / LABELS_CSV).is_file():
        files, labels = _csv_labels(base / LABELS_CSV, folder, root=root)
    elif (base / FEATURES_DIR).is_dir():
        files, labels = _age_labels(base / FEATURES_DIR, _image_files(folder, extensions))
    else:
        raise ConfigError(
            f"ffhq:{root}: no labels. FFHQ has no classes: put the ffhq-features-dataset JSON "
            f"files in {base / FEATURES_DIR}/ (labels = age // 10, as the paper's code) or "
            f"write {base / LABELS_CSV} with a 'file,label' header (docs/paper-scale.md)"
        )
    if not files:
        raise ConfigError(f"ffhq:{root}: no labelled images found under {folder}")
    return files, labels, max(labels) + 1


def _image_number(path: Path) -> int | None:
    match = re.fullmatch(r"(\d+)", path.stem)
    return int(match.group(1)) if match else None


def _age_labels(features: Path, images: list[Path]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for image in images:
        number = _image_number(image)
        annotation = features / f"{number:05d}.json" if number is not None else None
        if annotation is None or not annotation.is_file():
            continue
        age = _age(annotation)
        if age is not None:
            files.append(image)
            labels.append(int(age // 10))
    return files, labels


def _age(annotation: Path) -> float | None:
    """faceAttributes.age of the first face, None when the file lists no face."""
    try:
        faces = json.loads(annotation.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"ffhq: annotation {annotation} is not readable JSON ({e})") from e
    if not isinstance(faces, list) or not faces:
        return None
    try:
        age = float(faces[0]["faceAttributes"]["age"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"ffhq: annotation {annotation} has no faceAttributes.age") from e
    return age if math.isfinite(age) and age >= 0 else None


def _csv_labels(path: Path, folder: Path, *, root: str) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise ConfigError(f"ffhq:{root}: {path} needs a header line 'file,label'")
        for line, row in enumerate(reader, start=2):
            image, label = folder / row["file"], row["label"]
            if not image.is_file():
                raise ConfigError(f"ffhq:{root}: {path} line {line}: no image {image}")
            if not label.strip().isdigit():
                raise ConfigError(
                    f"ffhq:{root}: {path} line {line}: label must be an integer >= 0 "
                    f"(got {label!r})"
                )
            files.append(image)
            labels.append(int(label))
    return files, labels


def loader(
    files: Sequence[Path],
    transform: Callable[[int], Callable[[Tensor], Tensor]],
    decode: Callable[[Path], Tensor],
) -> Loader:
    """(indices, image size) -> (B, 3, S, S): decode each file, then the data set's transform."""

    def load(indices: Sequence[int], image_size: int) -> Tensor:
        fn = transform(image_size)
        return torch.stack([fn(decode(files[i])) for i in indices]).contiguous()

    return load
