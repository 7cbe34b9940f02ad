"""FedSGD simulation: its θ sequence is a plain FedSGD loop's; reports carry θ_r and ĝ."""

import torch
import torch.nn.functional as F

from gi_core.defenses import Defense
from gi_core.fl import ClientBatch, FLConfig, simulate_fedsgd
from gi_core.victims import build_victim


def _clients(n: int, b: int) -> list[ClientBatch]:
    rng = torch.Generator().manual_seed(3)
    return [
        ClientBatch(torch.rand(b, 3, 16, 16, generator=rng), torch.arange(b) + i) for i in range(n)
    ]


def _plain_fedsgd(model, clients, *, rounds: int, lr: float) -> list[list[torch.Tensor]]:
    """The textbook loop: every client's mean-CE gradient at θ_r, server averages, SGD step."""
    thetas = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(rounds):
        grads = []
        for c in clients:
            model.zero_grad()
            model.train()
            F.cross_entropy(model(c.images), c.labels).backward()
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        with torch.no_grad():
            for k, p in enumerate(model.parameters()):
                p -= lr * torch.stack([g[k] for g in grads]).mean(0)
        thetas.append([p.detach().clone() for p in model.parameters()])
    return thetas


def test_theta_sequence_equals_plain_fedsgd_loop():
    victim = build_victim("convnet", num_classes=8, image_size=16, width=4, seed=1)
    clients = _clients(3, 2)
    reports = []
    thetas = simulate_fedsgd(
        victim, clients, FLConfig(rounds=3, lr=0.5), defense=Defense(), on_report=reports.append
    )
    plain = _plain_fedsgd(victim, clients, rounds=3, lr=0.5)
    assert len(thetas) == len(plain) == 4
    for ours, ref in zip(thetas, plain, strict=True):
        for a, b in zip(ours.values(), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # theta actually moves between rounds, and every report is tagged with its round's theta
    assert not torch.equal(next(iter(thetas[0].values())), next(iter(thetas[3].values())))
    assert [(r.round, r.client) for r in reports] == [(r, c) for r in range(3) for c in range(3)]
    assert all(r.theta is thetas[r.round] for r in reports)


def test_defended_reports_drive_the_server_and_the_caller_model_is_untouched():
    victim = build_victim("convnet", num_classes=8, image_size=16, width=4, seed=1)
    before = [p.detach().clone() for p in victim.parameters()]
    reports = []
    config = FLConfig(rounds=2, lr=0.5)
    simulate_fedsgd(
        victim, _clients(2, 2), config, defense=Defense("sparsity", p=0.9), on_report=reports.append
    )
    assert all(torch.equal(a, b) for a, b in zip(before, victim.parameters(), strict=True))
    kept = sum(int(m.sum()) for m in reports[0].observed.masks)
    total = sum(m.numel() for m in reports[0].observed.masks)
    assert kept < 0.15 * total  # the server (and attacker) saw a sparsified gradient
