"""The CUDA tier: gi_core on a GPU (`make gpu-check`, docs/gpu.md). Skipped without a device.

Only gi_core is imported (torch, numpy, scipy, scikit-image), so the tier runs on a GPU machine
that has PyTorch but not the pipeline's services. Sizes are small: this checks the CUDA code
paths (device placement, vmap vs loop, batched cells, generator copies, metrics), not speed;
speed is benchmarks/gpu_check.py's job.
"""

from __future__ import annotations

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.batched import solve_together
from gi_core.attacks.engine import solve
from gi_core.attacks.registry import describer, entry_point
from gi_core.datasets import batch_indices, dataset_info, load_images
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.metrics import psnr, ssim
from gi_core.stylegan2 import StyleGAN2Config, StyleGAN2Options, build_stylegan2
from gi_core.victims import build_victim

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DATA, SIZE = "lfw-faces", 32


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: these tests compare against float32 references (TF32 is benchmarked apart)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(batch: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    idx = batch_indices(DATA, batch_size=batch, batch_index=index, image_size=SIZE)
    return load_images(DATA, idx, image_size=SIZE)


def _problem(dev: torch.device, *, batch: int = 2, index: int = 0, arch: str = "convnet"):
    classes = dataset_info(DATA, image_size=SIZE).num_classes
    model = build_victim(arch, num_classes=classes, image_size=SIZE, width=8, seed=0).to(dev)
    x, y = _batch(batch, index)
    x, y = x.to(dev), y.to(dev)
    problem = InversionProblem(
        model, client_gradient(model, x, y), y, (3, SIZE, SIZE), bn_target=bn_statistics(model, x)
    )
    return problem, x


def test_client_gradient_on_cuda_matches_cpu():
    classes = dataset_info(DATA, image_size=SIZE).num_classes
    model = build_victim("resnet20", num_classes=classes, image_size=SIZE, seed=0)
    x, y = _batch(4)
    on_cpu = client_gradient(model, x, y)
    on_gpu = client_gradient(model.cuda(), x.cuda(), y.cuda())
    assert len(on_cpu) == len(on_gpu)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.device.type == "cuda"
        # Relative to the tensor's norm. Measured on an H200 (torch 2.11, TF32 off): 2.0e-3,
        # not float rounding: cuDNN picks Winograd/FFT convolutions whose error is of that order
        # (docs/results/gpu.md). A wrong layer or a dropped term would be O(1).
        error = torch.linalg.vector_norm(b.cpu() - a) / torch.linalg.vector_norm(a)
        assert float(error) < 1e-2


def test_gi_x_on_cuda_lowers_its_cost_and_beats_the_start():
    problem, truth = _problem(torch.device("cuda"))
    config = method_config("gi-x", {"iterations": 200, "restarts": 2})
    result = reconstruct("gi-x", problem, config, seed=0)
    assert result.images.device.type == "cuda"
    assert result.status == "ok"
    curve = result.loss_curve[:, result.best_restart]
    assert float(curve[-1]) < float(curve[0])
    start = torch.rand_like(truth)
    assert float(psnr(result.images, truth).mean()) > float(psnr(start, truth).mean())


def _close_after(a, b, *, iterations: int) -> None:
    """One Adam step is ~lr * sign(grad), so a last-bit difference in a near-zero gradient
    entry flips a pixel by lr: after one step the paths agree to rounding; after several,
    a few pixels may differ by up to lr while the mean and the costs agree closely."""
    if iterations == 1:
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-4)
    else:
        assert float((a.images - b.images).abs().mean()) < 5e-3
    torch.testing.assert_close(a.restart_costs, b.restart_costs, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("iterations", [1, 5])
def test_vmap_and_loop_paths_agree_on_cuda(iterations):
    """Vectorised restarts (vmap) and the plain loop solve the same problem (R = 4)."""
    problem, _ = _problem(torch.device("cuda"))
    config = method_config("gi-x", {"iterations": iterations, "restarts": 4})
    describe = describer("gi-x")
    vmap, loop = (solve(describe(problem, config, seed=3), path=path) for path in ("vmap", "loop"))
    _close_after(vmap, loop, iterations=iterations)


@pytest.mark.parametrize("iterations", [1, 5])
def test_batched_cells_on_cuda_match_each_cell_alone(iterations):
    dev = torch.device("cuda")
    problems = [_problem(dev, index=i)[0] for i in range(3)]
    config = method_config("gi-x", {"iterations": iterations, "restarts": 2})
    fn, describe = entry_point("gi-x"), describer("gi-x")
    together = solve_together(
        [describe(p, config, seed=s) for s, p in enumerate(problems)], path="vmap"
    )
    for seed, (problem, batched) in enumerate(zip(problems, together, strict=True)):
        alone = fn(problem, config, seed=seed)
        _close_after(batched, alone, iterations=iterations)


def test_gi_x_repeats_closely_on_cuda():
    """Same seed, same result up to CUDA's nondeterministic kernels. Not bit for bit: PyTorch
    has no deterministic `adaptive_avg_pool2d_backward_cuda` (measured: use_deterministic_
    algorithms(True) refuses it), and every victim here pools adaptively. Whether the bits
    happen to agree is measured by benchmarks/gpu_check.py (docs/results/gpu.md)."""
    problem, _ = _problem(torch.device("cuda"))
    config = method_config("gi-x", {"iterations": 20, "restarts": 1})
    first = reconstruct("gi-x", problem, config, seed=5).images
    second = reconstruct("gi-x", problem, config, seed=5).images
    other = reconstruct("gi-x", problem, config, seed=6).images
    assert float((first - second).abs().mean()) < 1e-3
    assert float((first - other).abs().mean()) > 1e-2  # the seed matters: the check can fail


def test_gias_with_stylegan2_in_w_on_cuda():
    dev = torch.device("cuda")
    tiny = StyleGAN2Config(resolution=32, channels=(32, 32, 32, 32), z_dim=32, w_dim=32)
    gen = build_stylegan2(tiny, output_size=SIZE, options=StyleGAN2Options("w"), seed=0).to(dev)
    problem, _ = _problem(dev)
    config = method_config("gi-z/w", {"z_iterations": 4, "w_iterations": 4, "restarts": 2})
    result = reconstruct("gi-z/w", problem, config, seed=0, generator=gen)
    assert result.images.shape == (2, 3, SIZE, SIZE)
    assert result.images.device.type == "cuda"
    assert torch.isfinite(result.images).all()
    assert result.iterations == 8


def test_metrics_on_cuda_match_cpu():
    x, _ = _batch(4)
    noisy = (x + 0.05 * torch.randn_like(x, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    gx, gn = x.cuda(), noisy.cuda()
    torch.testing.assert_close(psnr(gn, gx).cpu(), psnr(noisy, x), rtol=1e-4, atol=0)
    torch.testing.assert_close(ssim(gn, gx).cpu(), ssim(noisy, x), rtol=1e-4, atol=1e-5)


def test_lpips_on_cuda_matches_cpu():
    from gi_core.errors import WeightsMissingError
    from gi_core.metrics import LPIPSMetric

    try:
        metric = LPIPSMetric()
    except WeightsMissingError as e:
        pytest.fail(f"LPIPS weights missing on the GPU machine: {e}")
    x, _ = _batch(4)
    y = x.flip(-1)
    on_cpu = metric(y, x)
    on_gpu = metric(y.cuda(), x.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-4)
