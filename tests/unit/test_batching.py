"""Batched cells (issue 12): P problems solved in one optimisation equal each solved alone;
per-cell checkpoints from a batch resume alone; chunk groups respect a memory budget."""

from __future__ import annotations

import io

import pytest
import torch

from gi_core.attacks import InversionProblem, method_config, reconstruct
from gi_core.attacks.batched import batchable, reconstruct_batch
from gi_core.defenses import Defense, apply_defense
from gi_core.generators import build_generator
from gi_core.gradients import bn_statistics, client_gradient
from gi_core.victims import build_victim
from tasks.batching import GroupBudget, cell_bytes, group_cells


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Batched and per-cell solves reduce in a different order; with several threads the
    # rounding differences are amplified by hundreds of Adam steps (0.19 abs at 2 threads for
    # gi-x+bn). One thread keeps the comparison at float tolerance, which is what it checks.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problems(n: int, *, batch: int = 1, size: int = 16, sparse: int | None = None):
    """n problems of one architecture: different images, labels and victim seeds; problem
    `sparse` carries a top-k sparsity mask (a per-problem mask inside the batch)."""
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.rand(batch, 3, size, size, generator=gen)
        y = (torch.arange(batch) + i) % 10
        model = build_victim("convnet", num_classes=10, image_size=size, width=4, seed=i % 2)
        masks, target = None, client_gradient(model, x, y)
        if i == sparse:
            defended = apply_defense(
                Defense("sparsity", p=0.5), model, x, y, generator=torch.Generator()
            )
            masks, target = defended.masks, defended.grads
        stats = bn_statistics(model, x)
        out.append(
            InversionProblem(model, target, y, (3, size, size), masks=masks, bn_target=stats)
        )
    return out


def _assert_same(batched, alone) -> None:
    # Different kernels (vmap over problems vs one row at a time) round differently, and Adam
    # turns rounding in near-zero gradients into visible steps: 1e-3 on [0, 1] images.
    torch.testing.assert_close(batched.restart_images, alone.restart_images, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(batched.restart_costs, alone.restart_costs, rtol=1e-3, atol=1e-5)
    assert batched.best_restart == alone.best_restart
    assert batched.iterations == alone.iterations


@pytest.mark.parametrize("path", ["vmap", "loop"])
@pytest.mark.parametrize("method", ["gi-x", "gi-x+bn"])
def test_batched_cells_equal_each_cell_alone(method: str, path: str) -> None:
    problems = _problems(3, batch=2, sparse=1)
    config = method_config(method, {"iterations": 8, "restarts": 2, "curve_every": 3})
    batched = reconstruct_batch(method, problems, config, seeds=[0, 1, 2], path=path)
    for i, problem in enumerate(problems):
        _assert_same(batched[i], reconstruct(method, problem, config, seed=i))
        assert batched[i].extras["path"] == path


def test_batched_gias_with_stacked_generator_copies_equals_each_cell() -> None:
    gen = build_generator("dcgan32", output_size=16, seed=0)
    problems = _problems(2, batch=1)
    config = method_config(
        "gi-z/w", {"z_iterations": 3, "w_iterations": 3, "restarts": 2, "curve_every": 2}
    )
    batched = reconstruct_batch("gi-z/w", problems, config, seeds=[4, 5], generator=gen)
    for i, problem in enumerate(problems):
        alone = reconstruct("gi-z/w", problem, config, seed=4 + i, generator=gen)
        _assert_same(batched[i], alone)


def test_gi_w_from_an_untrained_start_is_not_batchable() -> None:
    assert not batchable("gi-w", method_config("gi-w", {}))
    assert batchable("gi-w", method_config("gi-w", {"start": "given"}))
    assert not batchable("gi-x", method_config("gi-x", {"plateau_window": 5}))


def test_a_cell_checkpointed_inside_a_batch_resumes_alone() -> None:
    problems = _problems(2, batch=1)
    config = method_config("gi-x", {"iterations": 10, "restarts": 2, "prune_at": [0.3]})
    states: dict[int, dict] = {}

    def keep(i: int):
        def progress(p) -> None:
            if p.iteration == 6:
                buffer = io.BytesIO()  # through torch.save / weights_only load like a checkpoint
                torch.save(p.export_state(), buffer)
                buffer.seek(0)
                states[i] = torch.load(buffer, weights_only=True)

        return progress

    batched = reconstruct_batch(
        "gi-x", problems, config, seeds=[0, 1], progress=[keep(0), keep(1)], path="vmap"
    )
    for i, problem in enumerate(problems):
        resumed = reconstruct("gi-x", problem, config, seed=i, state=states[i])
        _assert_same(batched[i], resumed)
        assert int(states[i]["active"].shape[1]) == 1  # pruning happened before the checkpoint


def test_groups_respect_the_memory_budget() -> None:
    budget = GroupBudget(bytes=64 * 2**20, max_cells=64)
    per = cell_bytes(params=500_000, image_numel=3 * 32 * 32, batch=4, restarts=4, copies=0)
    sizes = [len(g) for g in group_cells(list(range(100)), per_cell_bytes=per, budget=budget)]
    assert sum(sizes) == 100 and max(sizes) * per <= budget.bytes
    assert max(sizes) == budget.bytes // per  # the budget is used, not just respected
    # a cell larger than the budget still runs, alone
    huge = group_cells(list(range(3)), per_cell_bytes=budget.bytes * 2, budget=budget)
    assert [len(g) for g in huge] == [1, 1, 1]
    capped = group_cells(list(range(10)), per_cell_bytes=1, budget=GroupBudget(2**30, 4))
    assert [len(g) for g in capped] == [4, 4, 2]


def test_vmap_and_loop_paths_give_the_same_image_gradient_on_a_bn_victim() -> None:
    """In float64 both paths must agree to rounding; torch.func's native BN under vmap was off
    by ~0.1 % (ARCHITECTURE decision 57), which this would catch."""
    from gi_core.attacks.engine import make_batch_cost

    torch.set_default_dtype(torch.float64)
    try:
        problems = _problems(2, batch=2)
        config = method_config("gi-x+bn", {"restarts": 2})
        x = torch.rand(4, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        grads = []
        for path in ("vmap", "loop"):
            xx = x.clone().requires_grad_(True)
            cost = make_batch_cost(problems, config, path=path)(xx)
            grads.append(torch.autograd.grad(cost.sum(), [xx])[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_trace_counts_attempts_and_the_iteration_a_cell_resumed_from() -> None:
    """Schedule provenance (issue 20): attempts that left a trace, and the resume point."""
    from tasks.work import TRACE_KEY, Trace

    fresh = Trace.resume(None, ())
    assert (fresh.attempts, fresh.resumed_from) == (1, None)
    assert Trace.resume(None, (), failed_before=True).attempts == 2  # a failure record
    second = Trace.resume({"stage": 0, TRACE_KEY: {"attempts": 1, "iteration": 7}}, ())
    assert (second.attempts, second.resumed_from) == (2, 7)
    third = Trace.resume({"stage": 0, TRACE_KEY: second.saved(12)}, ())
    assert (third.attempts, third.resumed_from) == (3, 12)
    # a checkpoint from before the trace kept its iteration: stage start + step in the stage
    old = Trace.resume({"stage": 1, "iteration": 3, TRACE_KEY: {"stage_starts": {"z": 0, "w": 5}}},
                       ())
    assert (old.attempts, old.resumed_from) == (2, 8)
