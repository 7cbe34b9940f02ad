"""Deterministic image data sets, from real images shipped inside installed packages.

Built-in names (no download, no network):
  lfw-faces       the 100 real LFW faces of skimage.data.lfw_subset() (gray 25x25, replicated to
                  3 channels). The subset carries no identity labels, so every face is its own
                  class: 100 samples, 100 classes.
  natural-photos  11 colour photos shipped offline in skimage, scikit-learn and matplotlib (see
                  PHOTOS), each cut into a fixed 4x4 grid of overlapping square crops:
                  176 samples, label = photo index (11 classes).
  synthetic       smooth random images from a fixed seed, for tests: 64 samples, 10 classes.
For users with their own data:
  imagefolder:<path>  one sub-folder of images per class (>= 2 classes), centre square crop;
                      JPEG, PNG (8/16-bit, palette), GIF (first frame), WebP, BMP, PPM/PGM,
                      TIFF. Any other file in the tree is refused, never skipped silently.
  cifar10:<root>      torchvision CIFAR-10 test split, already downloaded under <root>.

Images come back as (B, 3, S, S) float32 in [0, 1] on the CPU, S = image_size, resized with
antialiased bilinear interpolation. Decoded data sets are cached in memory per process.
Batches come from a fixed greedy plan, or from a seeded shuffle of it (`shuffle_seed`).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    import PIL.Image

from gi_core.errors import ConfigError

_BUILTIN = ("lfw-faces", "natural-photos", "synthetic")
_WITH_PATH = ("imagefolder", "cifar10", "imagenet", "ffhq")
_MIN_IMAGE_SIZE = 8
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
)  # fmt: skip

# (source, name) of the colour photos that load offline. Left out on purpose: skimage's
# colorwheel and logo (graphics, not photos), motorcycle_right (near-duplicate of the left view
# of the same stereo pair), cat (alias of chelsea), and lily/skin/kidney/eagle (need a download).
PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "astronaut"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "motorcycle_left"),
    ("skimage", "retina"),
    ("skimage", "rocket"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
    ("matplotlib", "grace_hopper.jpg"),
)
_CROP_GRID = 4  # crops per photo = _CROP_GRID ** 2
_CROP_FRACTION = 0.5  # crop side as a fraction of the photo's shorter side
_SYNTHETIC_SAMPLES, _SYNTHETIC_CLASSES, _SYNTHETIC_SEED = 64, 10, 0


@dataclass(frozen=True)
class DatasetInfo:
    """Size of a data set; channels is always 3 (gray images are replicated)."""

    name: str
    num_samples: int
    num_classes: int
    channels: int


@dataclass(frozen=True)
class _Source:
    """A data set's labels (N,) int64 and a loader (indices, image_size) -> (B, 3, S, S).
    `files`: the image file of each sample, for data sets read from the user's disk."""

    labels: Tensor
    num_classes: int
    load: Callable[[Sequence[int], int], Tensor]
    files: tuple[str, ...] | None = None


# --------------------------------------------------------------------------------------------
# Image helpers.


def _resize(images: Tensor, size: int) -> Tensor:
    """(N, C, h, w) in [0, 1] -> (N, C, size, size); antialiasing only acts when shrinking."""
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(0.0, 1.0).contiguous()


def _center_square(image: Tensor) -> Tensor:
    """(C, H, W) -> (C, s, s) with s = min(H, W), taken from the centre."""
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[:, top : top + s, left : left + s]


def _hwc_uint8_to_chw(array: np.ndarray) -> Tensor:
    """(H, W) or (H, W, C>=3) uint8 -> (3, H, W) float32 in [0, 1]."""
    t = torch.tensor(array, dtype=torch.uint8)  # copies: package arrays may be read-only
    if t.dim() == 2:
        t = t.unsqueeze(-1).expand(-1, -1, 3)
    # contiguous CHW once here, so crops and stacks below copy memory in order (10x faster)
    return t[..., :3].permute(2, 0, 1).float().div_(255.0).contiguous()


# --------------------------------------------------------------------------------------------
# Built-in data sets.


@functools.lru_cache(maxsize=8)
def _lfw_images(image_size: int) -> Tensor:
    from skimage.data import lfw_subset

    # lfw_subset(): (200, 25, 25) float64 in [0, 1]; the first 100 are faces, the rest are not.
    faces = torch.from_numpy(lfw_subset()[:100]).float()
    return _resize(faces.unsqueeze(1).expand(-1, 3, -1, -1), image_size)


def _load_photo(source: str, name: str) -> np.ndarray:
    """One photo as (H, W, 3) uint8, read from files inside the installed wheels."""
    if source == "skimage":
        import skimage.data

        if name == "motorcycle_left":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as img:
        return np.asarray(img.convert("RGB"))


def _grid_crops(photo: Tensor, image_size: int) -> Tensor:
    """(3, H, W) -> (_CROP_GRID**2, 3, S, S): overlapping squares on a fixed grid, row-major."""
    h, w = photo.shape[-2:]
    side = round(_CROP_FRACTION * min(h, w))
    tops = np.linspace(0, h - side, _CROP_GRID).round().astype(int)
    lefts = np.linspace(0, w - side, _CROP_GRID).round().astype(int)
    # resized one by one: stacking the full-resolution crops first would copy ~100 MB per photo
    crops = [photo[None, :, t : t + side, left : left + side] for t in tops for left in lefts]
    return torch.cat([_resize(crop, image_size) for crop in crops])


@functools.lru_cache(maxsize=8)
def _photo_images(image_size: int) -> Tensor:
    photos = [_hwc_uint8_to_chw(_load_photo(src, name)) for src, name in PHOTOS]
    return torch.cat([_grid_crops(p, image_size) for p in photos])


@functools.lru_cache(maxsize=8)
def _synthetic_images(image_size: int) -> Tensor:
    # 4x4 uniform noise upsampled bilinearly: smooth images in [0, 1], identical content at
    # every image_size.
    gen = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    coarse = torch.rand(_SYNTHETIC_SAMPLES, 3, 4, 4, generator=gen)
    return _resize(coarse, image_size)


def _in_memory(images: Callable[[int], Tensor], labels: Tensor) -> _Source:
    def load(indices: Sequence[int], image_size: int) -> Tensor:
        return images(image_size)[list(indices)]  # advanced indexing copies: cache stays intact

    return _Source(labels=labels, num_classes=int(labels.max()) + 1, load=load)


def _builtin_source(kind: str) -> _Source:
    if kind == "lfw-faces":
        return _in_memory(_lfw_images, torch.arange(100))
    if kind == "natural-photos":
        labels = torch.arange(len(PHOTOS)).repeat_interleave(_CROP_GRID**2)
        return _in_memory(_photo_images, labels)
    labels = torch.arange(_SYNTHETIC_SAMPLES) % _SYNTHETIC_CLASSES
    return _in_memory(_synthetic_images, labels)


# --------------------------------------------------------------------------------------------
# Data sets on the user's disk.


def _cifar10_source(root: str) -> _Source:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root, train=False, download=False)
    except RuntimeError as e:
        raise ConfigError(
            f"cifar10:{root}: no CIFAR-10 test split under {root!r} (expected "
            f"{root}/cifar-10-batches-py/test_batch). Download it once on a machine with "
            "internet, e.g. torchvision.datasets.CIFAR10(root, train=False, download=True), "
            "and copy the folder here"
        ) from e
    data = ds.data  # (10000, 32, 32, 3) uint8, already in memory

    def load(indices: Sequence[int], image_size: int) -> Tensor:
        batch = torch.stack([_hwc_uint8_to_chw(data[i]) for i in indices])
        return _resize(batch, image_size)

    return _Source(labels=torch.tensor(ds.targets), num_classes=len(ds.classes), load=load)


def _imagefolder_source(path: str) -> _Source:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"imagefolder:{path}: no such directory; give the folder that holds "
            "one sub-folder of images per class"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    unsupported: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_dir() or f.name.startswith("."):
                continue  # hidden files (.DS_Store, ._*) are not images
            (files if f.suffix.lower() in IMAGE_EXTENSIONS else unsupported).append((f, label))
    loose = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    if unsupported:
        f = unsupported[0][0]
        raise ConfigError(
            f"imagefolder:{path}: unsupported file {f} ({len(unsupported)} in all); supported: "
            f"{', '.join(IMAGE_EXTENSIONS)}. Convert it to PNG or move it out of the folder"
        )
    if loose and not classes:
        raise ConfigError(
            f"imagefolder:{path}: the images lie directly in the folder; put them in one "
            "sub-folder per class (at least 2 classes)"
        )

    def load(indices: Sequence[int], image_size: int) -> Tensor:
        images = [_center_square(decode_image_file(files[i][0])) for i in indices]
        return torch.cat([_resize(image[None], image_size) for image in images])

    source = _Source(
        labels=torch.tensor([label for _, label in files], dtype=torch.int64),
        num_classes=len(classes),
        load=load,
    )
    return dataclasses.replace(source, files=tuple(str(f) for f, _ in files))


def decode_image_file(path: Path | str) -> Tensor:
    """One image file -> (3, H, W) float32 in [0, 1], as an image viewer shows it; ConfigError
    naming the file and what to do when it does not decode or its scale is not defined.

    Unsigned integers are scaled by their full range (8-bit by 255, 16-bit by 65535: PIL's
    convert("RGB") would clip 16-bit to white); float images must already lie in [0, 1] (a
    float TIFF in 0..1 would otherwise become black); signed integers, float values outside
    [0, 1], transparency and colour models other than gray/RGB/YCbCr/CMYK are refused, because
    no scaling of theirs is the one a viewer shows. Palette, gray and bilevel images become
    RGB; CMYK goes through its embedded ICC profile when it has one; a GIF gives its first
    frame. Float and multi-channel TIFFs Pillow cannot open are read with tifffile."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # full decode now: a truncated file fails here, not in a job
            return _pil_to_chw(img, path)
    except ConfigError:
        raise
    except UnidentifiedImageError as e:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            return _tiff_to_chw(path, e)
        raise ConfigError(f"image {path} does not decode ({e}); replace or delete the file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"image {path} does not decode ({e}); replace or delete the file") from e


_SIGNED_TIFF, _FLOAT_TIFF = 2, 3  # TIFF tag 339 SampleFormat values
_AS_RGB = frozenset({"1", "L", "P", "RGB", "RGBX", "YCbCr"})
_WITH_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _pil_to_chw(img: PIL.Image.Image, path: Path | str) -> Tensor:
    """A decoded PIL image -> (3, H, W) float32 in [0, 1] (see decode_image_file)."""
    mode = img.mode
    formats = _tiff_sample_formats(img)
    if _SIGNED_TIFF in formats:
        raise _refuse(path, "holds signed integers, whose scale a viewer would have to guess")
    if mode == "P" and "transparency" in img.info:
        mode, img = "RGBA", img.convert("RGBA")
    if mode in _AS_RGB:
        return _hwc_uint8_to_chw(np.asarray(img.convert("RGB")))
    if mode in _WITH_ALPHA:
        rgba = np.asarray(img.convert("RGBA"))
        if rgba[..., 3].min() < 255:
            raise _refuse(path, "is partly transparent: the colour under its transparent "
                                "pixels is undefined; flatten it onto a background")
        return _hwc_uint8_to_chw(rgba)
    if mode == "CMYK":
        return _hwc_uint8_to_chw(np.asarray(_cmyk_to_rgb(img)))
    if mode in _UINT16:
        return _scaled_gray(np.asarray(img, dtype=np.float64), 65535.0, path)
    if mode == "I":  # 32-bit container: a 16-bit PNG, or a 16/32-bit unsigned TIFF
        bits = int(getattr(img, "tag_v2", {}).get(258, (16,))[0])
        if bits > 16:  # Pillow reads uint32 samples as int32 (wrapped): tifffile reads them
            return _tiff_to_chw(path, None)
        return _scaled_gray(np.asarray(img, dtype=np.float64), 2.0**bits - 1.0, path)
    if mode == "F":
        return _unit_float(np.asarray(img, dtype=np.float64), path)
    raise _refuse(path, f"uses the colour model {mode!r}, which has no defined RGB view here")


def _tiff_sample_formats(img: PIL.Image.Image) -> set[int]:
    tags = getattr(img, "tag_v2", None)
    value = tags.get(339) if tags is not None else None
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, tuple) else (value,))}


def _cmyk_to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Through the image's own ICC profile when it has one (as colour-managed viewers do)."""
    from PIL import ImageCms

    icc = img.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"),
                                                  outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            converted = None  # a broken profile: fall back to the plain conversion below
        if converted is not None:
            return converted
    return img.convert("RGB")


def _scaled_gray(gray: np.ndarray, full: float, path: Path | str) -> Tensor:
    if gray.size and (gray.min() < 0 or gray.max() > full):
        raise _refuse(path, f"has values {gray.min():g}..{gray.max():g} outside its 0..{full:g} "
                            "range")
    t = torch.from_numpy(gray / full).float()
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


def _unit_float(array: np.ndarray, path: Path | str) -> Tensor:
    """(H, W) or (H, W, 3) floats that must lie in [0, 1] -> (3, H, W)."""
    if not np.isfinite(array).all():
        raise _refuse(path, "is a float image with NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise _refuse(path, f"is a float image with values {array.min():g}..{array.max():g}; "
                            "only float images in 0..1 have a defined view")
    t = torch.from_numpy(array).float()
    t = t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.contiguous()


def _tiff_to_chw(path: Path | str, pil_error: Exception | None) -> Tensor:
    """TIFFs Pillow cannot open (float RGB, float64, ...), read with tifffile."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            array, photometric = page.asarray(), page.photometric
    except (ImportError, OSError, ValueError, IndexError, KeyError) as e:
        why = f"{pil_error}; {e}" if pil_error else str(e)
        raise ConfigError(f"image {path} does not decode ({why}); replace or delete the "
                          "file") from e
    rgb = array.ndim == 3 and array.shape[-1] == 3 and photometric == tifffile.PHOTOMETRIC.RGB
    if not (array.ndim == 2 or rgb):
        kind = getattr(photometric, "name", photometric)
        raise _refuse(path, f"is a TIFF of shape {array.shape} ({kind}); only gray or RGB "
                            "TIFFs are read")
    if array.dtype.kind == "f":
        return _unit_float(array.astype(np.float64), path)
    if array.dtype.kind == "u":
        full = float(np.iinfo(array.dtype).max)
        t = torch.from_numpy(array.astype(np.float64) / full).float()
        return (t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t.permute(2, 0, 1)) \
            .contiguous()
    raise _refuse(path, f"holds {array.dtype} samples, whose scale a viewer would have to guess")


def _refuse(path: Path | str, why: str) -> ConfigError:
    return ConfigError(f"image {path} {why}; convert it to an 8- or 16-bit RGB or gray PNG "
                       "(or remove it from the folder)")


# --------------------------------------------------------------------------------------------
# Public API.


def available_datasets() -> list[str]:
    """The data set names this module knows; `kind:<...>` entries need a path after the colon."""
    return [*_BUILTIN, "imagefolder:<path>", "cifar10:<root>", "imagenet:<root>", "ffhq:<root>"]


def _paper_source(kind: str, root: str) -> _Source:
    """imagenet:/ffhq: as the paper's code prepares them (gi_core.paper_data)."""
    from gi_core import paper_data  # imports nothing from here at import time

    listing = paper_data.imagenet_files if kind == "imagenet" else paper_data.ffhq_files
    files, labels, classes = listing(root, IMAGE_EXTENSIONS)
    transform = paper_data.imagenet_transform if kind == "imagenet" else paper_data.ffhq_transform
    return _Source(
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=classes,
        load=paper_data.loader(files, transform, decode_image_file),
        files=tuple(str(f) for f in files),
    )


@functools.lru_cache(maxsize=16)
def _source(name: str) -> _Source:
    kind, _, arg = name.partition(":")
    if name in _BUILTIN:
        return _builtin_source(name)
    if kind in ("imagenet", "ffhq") and arg:
        return _paper_source(kind, arg)
    if kind in _WITH_PATH and arg:
        return _cifar10_source(arg) if kind == "cifar10" else _imagefolder_source(arg)
    if kind in _WITH_PATH:
        raise ConfigError(f"data set {name!r} needs a path: write '{kind}:/path/to/data'")
    raise ConfigError(f"unknown data set {name!r}; known: {', '.join(available_datasets())}")


def _check_image_size(image_size: int) -> None:
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")


def dataset_info(name: str, *, image_size: int) -> DatasetInfo:
    """Samples and classes of `name`; image_size is only validated (sizes don't depend on it)."""
    _check_image_size(image_size)
    src = _source(name)
    if src.num_classes < 2:
        raise ConfigError(
            f"{name!r} has {src.num_classes} class: with one class the victim's loss is "
            "constant and every client gradient is zero. Give at least 2 classes (for "
            "imagefolder: one sub-folder per class)"
        )
    return DatasetInfo(
        name=name, num_samples=len(src.labels), num_classes=src.num_classes, channels=3
    )


def load_images(name: str, indices: Sequence[int], *, image_size: int) -> tuple[Tensor, Tensor]:
    """Images (B, 3, S, S) float32 in [0, 1] and labels (B,) int64 of the given sample indices."""
    _check_image_size(image_size)
    src = _source(name)
    n = len(src.labels)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ConfigError(f"indices {bad[:5]} out of range for {name!r} with {n} samples")
    return src.load(indices, image_size), src.labels[list(indices)].clone()


def _plan_batches(
    labels: Sequence[int], batch_size: int, seed: int | None = None
) -> tuple[tuple[int, ...], ...]:
    """Split sample indices into disjoint batches of batch_size, deterministically.

    With a `seed`, the order of the samples within each class, the tie-break order of the
    classes and the order of the batches are a seeded permutation (numpy PCG64): the batches
    stay disjoint with unique labels, but batch 0 is no longer the first classes in sorted
    order.

    If batch_size <= number of classes every batch has unique labels: each batch takes the
    next unused sample of the batch_size classes with most samples left (ties: lower label),
    a greedy that yields the largest possible number of such batches. Otherwise each batch
    fills itself in rounds over those classes, spreading labels as evenly as possible.
    """
    rng = np.random.default_rng(seed) if seed is not None else None
    order = rng.permutation(len(labels)) if rng is not None else range(len(labels))
    queues: dict[int, deque[int]] = {}
    for index in order:
        queues.setdefault(int(labels[index]), deque()).append(int(index))
    # the heap orders by (-left, rank); rank = label unshuffled, a random rank when seeded
    ranks = dict(
        zip(
            sorted(queues),
            rng.permutation(len(queues)) if rng is not None else range(len(queues)),
            strict=True,
        )
    )
    heap = [(-len(q), int(ranks[label])) for label, q in queues.items()]
    by_rank = {int(r): label for label, r in ranks.items()}
    heapq.heapify(heap)
    unique, remaining = batch_size <= len(queues), len(labels)
    batches: list[tuple[int, ...]] = []
    while remaining >= batch_size and (not unique or len(heap) >= batch_size):
        batch = _take_batch(heap, queues, batch_size, by_rank)
        remaining -= batch_size
        batches.append(tuple(sorted(batch)))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return tuple(batches)


def _take_batch(
    heap: list[tuple[int, int]],
    queues: dict[int, deque[int]],
    batch_size: int,
    by_rank: dict[int, int],
) -> list[int]:
    """Pop batch_size samples, at most one per class per round; heap holds (-left, rank)."""
    batch: list[int] = []
    while len(batch) < batch_size:
        taken = [heapq.heappop(heap) for _ in range(min(batch_size - len(batch), len(heap)))]
        for _, rank in taken:
            queue = queues[by_rank[rank]]
            batch.append(queue.popleft())
            if queue:
                heapq.heappush(heap, (-len(queue), rank))
    return batch


# How a batch's labels are drawn (issue 19 Deliver 2; decision 195): "distinct" (every label
# at most once: the fixed greedy plan above, the paper's setting), "random" (each image's label
# drawn uniformly, with replacement, among the classes with samples left), or an int k
# (exactly k distinct labels per batch, spread as evenly as B allows: App. F's disguise).
LabelDraw = str | int
LABEL_DRAWS = ("distinct", "random")


def _plan_k_labels(
    labels: Sequence[int], batch_size: int, k: int, seed: int | None
) -> tuple[tuple[int, ...], ...]:
    """Disjoint batches with exactly k distinct labels each: every batch takes the k classes
    with most samples left (ties: lower label, or a seeded rank), B // k images of each and one
    more of the first B % k, and the plan ends when those classes cannot fill a batch."""
    if not 1 <= k <= batch_size:
        raise ConfigError(f"distinct labels per batch must be in 1..{batch_size} (got {k})")
    rng = np.random.default_rng(seed) if seed is not None else None
    order = rng.permutation(len(labels)) if rng is not None else range(len(labels))
    queues: dict[int, deque[int]] = {}
    for index in order:
        queues.setdefault(int(labels[index]), deque()).append(int(index))
    shuffled = rng.permutation(len(queues)) if rng is not None else range(len(queues))
    ranks = dict(zip(sorted(queues), shuffled, strict=True))
    counts = [batch_size // k + (1 if i < batch_size % k else 0) for i in range(k)]
    batches: list[tuple[int, ...]] = []
    while True:
        chosen = sorted(queues, key=lambda c: (-len(queues[c]), ranks[c]))[:k]
        if len(chosen) < k:
            return tuple(batches)
        wanted = list(zip(chosen, counts, strict=True))
        if any(len(queues[c]) < n for c, n in wanted):
            return tuple(batches)
        batch = [queues[c].popleft() for c, n in wanted for _ in range(n)]
        batches.append(tuple(sorted(batch)))


def _plan_random_labels(
    labels: Sequence[int], batch_size: int, seed: int | None
) -> tuple[tuple[int, ...], ...]:
    """Disjoint batches whose labels are drawn with replacement: each image's class uniformly
    among the classes with samples left (numpy PCG64 from `seed`, 0 when None), its sample the
    next of that class (in data set order, or a seeded order)."""
    rng = np.random.default_rng(0 if seed is None else seed)
    order = rng.permutation(len(labels)) if seed is not None else range(len(labels))
    queues: dict[int, deque[int]] = {}
    for index in order:
        queues.setdefault(int(labels[index]), deque()).append(int(index))
    remaining, batches = len(labels), []
    while remaining >= batch_size:
        batch = []
        for _ in range(batch_size):
            left = sorted(c for c, q in queues.items() if q)
            batch.append(queues[left[int(rng.integers(len(left)))]].popleft())
        remaining -= batch_size
        batches.append(tuple(sorted(batch)))
    return tuple(batches)


def _check_draw(draw: LabelDraw) -> None:
    if isinstance(draw, bool) or not (draw in LABEL_DRAWS or isinstance(draw, int)):
        raise ConfigError(f"label draw must be one of {LABEL_DRAWS} or an int k (got {draw!r})")


@functools.lru_cache(maxsize=64)
def _batch_plan(
    name: str, batch_size: int, seed: int | None, draw: LabelDraw = "distinct"
) -> tuple[tuple[int, ...], ...]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    _check_draw(draw)
    labels = _source(name).labels.tolist()
    if draw == "random":
        return _plan_random_labels(labels, batch_size, seed)
    if isinstance(draw, int):
        return _plan_k_labels(labels, batch_size, draw, seed)
    return _plan_batches(labels, batch_size, seed)


def max_batches(
    name: str,
    *,
    batch_size: int,
    image_size: int,
    shuffle_seed: int | None = None,
    draw: LabelDraw = "distinct",
) -> int:
    """How many disjoint batches of batch_size `batch_indices` can hand out for `name`."""
    _check_image_size(image_size)
    return len(_batch_plan(name, batch_size, shuffle_seed, draw))


def batch_indices(
    name: str,
    *,
    batch_size: int,
    batch_index: int,
    image_size: int,
    shuffle_seed: int | None = None,
    draw: LabelDraw = "distinct",
) -> list[int]:
    """Sample indices of batch number batch_index (ascending). Deterministic for a given
    shuffle_seed and `draw`; batches with different batch_index never share a sample; with
    draw "distinct" labels are unique within a batch whenever batch_size <= num_classes."""
    _check_image_size(image_size)
    plan = _batch_plan(name, batch_size, shuffle_seed, draw)
    if not 0 <= batch_index < len(plan):
        valid = f"0..{len(plan) - 1}" if plan else "none"
        raise ConfigError(
            f"batch_index={batch_index} is out of range: {name!r} has only {len(plan)} "
            f"disjoint batches of batch_size={batch_size} (valid batch_index: {valid}); "
            "use a smaller batch_size or fewer batches"
        )
    return list(plan[batch_index])


def check_decodable(name: str, indices: Sequence[int], *, image_size: int) -> list[str]:
    """Decode every image file of `indices` once (data sets on the user's disk): one message
    per file that does not decode or is smaller than `image_size` (it would be upsampled into a
    blur), naming the file. Built-in data sets live in memory and always pass."""
    files = _source(name).files
    if files is None:
        return []
    problems = []
    for i in sorted(set(indices)):
        try:
            image = decode_image_file(files[i])
        except ConfigError as e:
            problems.append(str(e))
            continue
        side = min(image.shape[-2:])
        if side < image_size:
            problems.append(
                f"image {files[i]} is {image.shape[-1]}x{image.shape[-2]} px, smaller than "
                f"data.image_size {image_size}; use a smaller image_size or remove the image"
            )
    return problems


# --------------------------------------------------------------------------------------------
# Colour model (issue 16 Deliver 5): `data.colour: auto` asks this.

# The built-in sets' colour models (tests/unit/test_colour_model.py checks them pixel by pixel).
_BUILTIN_COLOUR = {"lfw-faces": "gray", "natural-photos": "rgb", "synthetic": "rgb"}
# PIL modes with one intensity channel: they decode to three identical channels.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@functools.lru_cache(maxsize=16)
def detect_colour(name: str) -> str:
    """'gray' when every image of data set `name` is gray, else 'rgb'. Image folders are
    judged by each file's PIL mode (read from the header, nothing is decoded), so a gray
    picture saved as RGB counts as colour: declare such a folder with `data.colour: gray`.
    The downloaded benchmark sets (cifar10, imagenet, ffhq) are colour."""
    if name in _BUILTIN_COLOUR:
        return _BUILTIN_COLOUR[name]
    kind = name.partition(":")[0]
    files = _source(name).files
    if kind != "imagefolder" or not files:
        return "rgb"
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in _GRAY_MODES:
                    return "rgb"
        except (OSError, SyntaxError, ValueError):
            continue  # undecodable files are refused where a batch uses them (check_decodable)
    return "gray"
