"""Gradient and reconstruction groups: one Zarr v3 group per cell, packed in one zip file.

Each group is written into a ZipStore under a temp name and renamed into place (see
storage.atomic), so a reader never sees a half-written group and a cell costs one file, not the
2 files per array (zarr.json + chunks) of a directory store — that matters on cluster
filesystems with 10^5 cells. Chunks are compressed by Zarr (blosc lz4, no shuffle); the zip
entries themselves are stored uncompressed. Open one with `open_group(path)`.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec
from zarr.storage import ZipStore

from storage.atomic import publishing
from storage.errors import StorageError

FORMAT_VERSION = 1
# 4 Mi float32 = 16 MiB per gradient chunk: ResNet18 (11.2M params) is 3 chunks, which zarr
# compresses in parallel; all other arrays are one chunk each.
GRADIENT_CHUNK = 4 * 1024 * 1024
# lz4 without shuffle: a top-k sparsified gradient shrinks to ~0.4 of raw (as much as with
# byte shuffle) while writes stay well above 200 MB/s; dense float gradients are close to
# incompressible anyway, and without shuffle lz4 passes them through at disk speed. zstd-1
# shrinks sparse gradients more (~0.25) but wrote 2-3x slower. See docs/results/storage.md.
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")


@dataclass(frozen=True)
class StoredGradient:
    """What the attacker observes for one gradient cell, plus the client's ground truth.

    gradient: (N,) float32, defended, flattened in `param_names` order (gi_core ParamIndex).
    images: (B, C, H, W) float32 in [0, 1], the client's batch (ground truth for metrics).
    labels: (B,) int64. bn_stats: per BN layer (mean (C,), biased var (C,)), float32, or ().
    mask: (N,) bool attacker-visible sparsity mask (True = entry kept), None without sparsity.
    attrs: JSON-able metadata, normally {"cell": <gradient cell dict>, ...}.
    """

    gradient: np.ndarray
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    images: np.ndarray
    labels: np.ndarray
    bn_stats: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    mask: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredReconstruction:
    """One inversion cell's result.

    images: (B, C, H, W) float32 in [0, 1], the chosen restart after its last step.
    restart_images: (R, B, C, H, W) or None (stored only with storage.keep_restarts).
    restart_costs: (R,) float64 final cost per restart. loss_curve: (points, R) float32 with
    curve_iterations: (points,) int64. status: ok | diverged | interrupted.
    snapshots: (S, R, B, C, H, W) float32 in [0, 1], every restart's images after the global
    iterations `snapshot_iterations` (S,) int64 (storage.snapshots of the grid), or None.
    attrs: extra JSON-able metadata, normally {"cell": <inversion cell dict>}.
    """

    images: np.ndarray
    restart_costs: np.ndarray
    loss_curve: np.ndarray
    curve_iterations: np.ndarray
    status: str
    iterations: int
    wall_seconds: float
    device: str
    best_restart: int
    restart_images: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    snapshots: np.ndarray | None = None
    snapshot_iterations: np.ndarray | None = None


def to_numpy(x: Any, dtype: Any) -> np.ndarray:
    """numpy array of `dtype` from a numpy array or a (CPU or GPU) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor; storage needs no torch import for this
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))


def write_gradient(path: Path, grad: StoredGradient) -> None:
    """Publish `grad` as the zip group at `path` (replacing any previous one atomically)."""
    _check_gradient(grad)
    bn_channels = [int(np.asarray(m).size) for m, _ in grad.bn_stats]
    attrs = {
        **_json_clean(grad.attrs),
        "format": FORMAT_VERSION,
        "param_names": list(grad.param_names),
        "param_shapes": [list(s) for s in grad.param_shapes],
        "bn_channels": bn_channels,
        "gradient_size": _size(grad.gradient),
    }
    arrays: dict[str, np.ndarray] = {
        **_gradient_arrays(to_numpy(grad.gradient, np.float32),
                           None if grad.mask is None else to_numpy(grad.mask, np.bool_)),
        "images": to_numpy(grad.images, np.float32),
        "labels": to_numpy(grad.labels, np.int64),
    }
    if grad.bn_stats:
        # One (2, sum C) array instead of 2 arrays per layer; bn_channels splits it again.
        means = np.concatenate([to_numpy(m, np.float32).ravel() for m, _ in grad.bn_stats])
        variances = np.concatenate([to_numpy(v, np.float32).ravel() for _, v in grad.bn_stats])
        arrays["bn"] = np.stack([means, variances])
    _write_group(path, attrs, arrays)


def read_gradient(path: Path) -> StoredGradient:
    attrs, arrays = _read_group(path)
    sizes = attrs.pop("bn_channels")
    bn: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    if "bn" in arrays:
        splits = np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1]
        bn = tuple(zip(np.split(arrays["bn"][0], splits), np.split(arrays["bn"][1], splits),
                       strict=True))
    mask = _unpack_mask(arrays.get("mask_bits"), int(attrs.pop("gradient_size")))
    return StoredGradient(
        gradient=_dense_gradient(arrays, mask),
        param_names=tuple(attrs.pop("param_names")),
        param_shapes=tuple(tuple(s) for s in attrs.pop("param_shapes")),
        images=arrays["images"],
        labels=arrays["labels"],
        bn_stats=bn,
        mask=mask,
        attrs={k: v for k, v in attrs.items() if k != "format"},
    )


def write_reconstruction(path: Path, rec: StoredReconstruction, *, keep_restarts: bool) -> None:
    """Publish `rec` at `path`; restart images are kept only if `keep_restarts`.

    A previous group at `path` (from an attempt that crashed before its commit marker) is
    replaced atomically.
    """
    attrs = {
        **_json_clean(rec.attrs),
        "format": FORMAT_VERSION,
        "status": rec.status,
        "iterations": int(rec.iterations),
        "wall_seconds": float(rec.wall_seconds),
        "device": rec.device,
        "best_restart": int(rec.best_restart),
    }
    arrays = {
        "images": to_numpy(rec.images, np.float32),
        "restart_costs": to_numpy(rec.restart_costs, np.float64),
        "loss_curve": to_numpy(rec.loss_curve, np.float32),
        "curve_iterations": to_numpy(rec.curve_iterations, np.int64),
    }
    if keep_restarts and rec.restart_images is not None:
        arrays["restart_images"] = to_numpy(rec.restart_images, np.float32)
    if rec.snapshots is not None and rec.snapshot_iterations is not None:
        arrays["snapshots"] = to_numpy(rec.snapshots, np.float32)
        arrays["snapshot_iterations"] = to_numpy(rec.snapshot_iterations, np.int64)
    _write_group(path, attrs, arrays)


def read_reconstruction(path: Path) -> StoredReconstruction:
    attrs, arrays = _read_group(path)
    return StoredReconstruction(
        images=arrays["images"],
        restart_costs=arrays["restart_costs"],
        loss_curve=arrays["loss_curve"],
        curve_iterations=arrays["curve_iterations"],
        restart_images=arrays.get("restart_images"),
        snapshots=arrays.get("snapshots"),
        snapshot_iterations=arrays.get("snapshot_iterations"),
        status=attrs.pop("status"),
        iterations=attrs.pop("iterations"),
        wall_seconds=attrs.pop("wall_seconds"),
        device=attrs.pop("device"),
        best_restart=attrs.pop("best_restart"),
        attrs={k: v for k, v in attrs.items() if k != "format"},
    )


def _gradient_arrays(gradient: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The stored form of a (possibly sparsified) flat gradient.

    With a sparsity mask the gradient is zero outside it, so (mask, kept values) is exact and
    ~7x smaller than the dense vector for p=0.9 — and far faster to write than compressing
    the zeros. The mask is bit-packed (1.4 MB instead of 11 MB of bools for ResNet18).
    """
    if mask is None:
        return {"gradient": gradient}
    bits = np.packbits(mask)
    if np.any(gradient[~mask]):  # not a masked gradient after all: keep it dense, exactly
        return {"gradient": gradient, "mask_bits": bits}
    return {"gradient_kept": gradient[mask], "mask_bits": bits}


def _dense_gradient(arrays: dict[str, np.ndarray], mask: np.ndarray | None) -> np.ndarray:
    if "gradient" in arrays:
        return arrays["gradient"]
    assert mask is not None, "a kept-values gradient is always stored with its mask"
    dense = np.zeros(mask.shape, np.float32)
    dense[mask] = arrays["gradient_kept"]
    return dense


def _unpack_mask(bits: np.ndarray | None, n: int) -> np.ndarray | None:
    return None if bits is None else np.unpackbits(bits, count=n).astype(np.bool_)


def _read_group(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with open_group(path) as group:
            attrs: dict[str, Any] = dict(group.attrs)
            arrays = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    except StorageError:
        raise
    except _READ_ERRORS as e:
        # a chunk that fails its CRC or does not decompress: name the file, not zarr's internals
        raise StorageError(f"damaged stored group {path} ({type(e).__name__}: {e}); "
                           f"`gi-eval verify --deep` moves it to quarantine") from e
    return attrs, arrays


# What zipfile, zarr and numcodecs raise on a damaged group (truncated, overwritten, foreign).
_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError,
                TypeError, zarr.errors.BaseZarrError)


@contextlib.contextmanager
def open_group(path: Path) -> Iterator[zarr.Group]:
    """The Zarr group stored in the zip at `path`, read-only; closed on exit. StorageError
    naming the file when it is missing, not a zip or not a Zarr group."""
    if not path.is_file():
        what = "a directory, not a zip group" if path.is_dir() else "missing"
        raise StorageError(f"no stored group at {path} ({what})")
    try:
        # ZipStore opens lazily: open it here, so a bad file fails before zarr wraps it (and
        # before close() would raise AttributeError '_zf' over the real BadZipFile)
        zipfile.ZipFile(path).close()
        store = ZipStore(path, mode="r")
        group = zarr.open_group(store=store, mode="r")
    except _READ_ERRORS as e:
        raise StorageError(f"damaged stored group {path} ({type(e).__name__}: {e}); "
                           f"`gi-eval verify` moves it to quarantine") from e
    try:
        yield group
    finally:
        store.close()


def _write_group(path: Path, attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    with publishing(path) as tmp:
        store = ZipStore(tmp, mode="w")
        try:
            # Attributes go in at creation: a ZipStore cannot rewrite zarr.json later.
            group = zarr.create_group(store=store, attributes=dict(attrs))
            for name, data in arrays.items():
                _write_array(group, name, data)
        finally:
            store.close()


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = _chunks(name, data.shape)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             compressors=_COMPRESSOR, fill_value=0)
    if data.size:
        arr[...] = data


def _chunks(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    if name in ("gradient", "gradient_kept"):
        return (max(1, min(shape[0], GRADIENT_CHUNK)),)
    return tuple(max(1, s) for s in shape)  # small arrays: one chunk each


def _check_gradient(grad: StoredGradient) -> None:
    n = _size(grad.gradient)
    expected = sum(int(np.prod(s)) for s in grad.param_shapes)
    if len(grad.param_names) != len(grad.param_shapes) or n != expected:
        raise StorageError(
            f"gradient has {n} entries but the parameter index describes {expected} "
            f"({len(grad.param_names)} names, {len(grad.param_shapes)} shapes)"
        )
    if grad.mask is not None and _size(grad.mask) != n:
        raise StorageError(f"mask has {_size(grad.mask)} entries, gradient has {n}")


def _size(x: Any) -> int:
    return int(x.numel()) if hasattr(x, "numel") else int(np.asarray(x).size)


def _json_clean(attrs: Mapping[str, Any]) -> dict[str, Any]:
    # Round-trip through JSON now so a non-serialisable attr fails here, with the key named,
    # rather than deep inside zarr after the temp file exists.
    try:
        return dict(json.loads(json.dumps(dict(attrs), allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise StorageError(f"group attrs are not JSON-serialisable: {e}") from e
