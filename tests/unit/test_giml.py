"""GIML (Algorithm 2): vectorised task search, the λ term, Reptile, bit-exact resume."""

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from gi_core.defenses import Defense, apply_defense
from gi_core.errors import ConfigError
from gi_core.generators import build_generator
from gi_core.giml import (
    GIMLConfig,
    GIMLTask,
    MetaState,
    TaskCost,
    adapt,
    initial_state,
    latent_search,
    meta_train,
    reptile_update,
    stack_tasks,
)
from gi_core.gradients import victim_params
from gi_core.victims import build_victim

SIZE, B = 16, 2
GRIDS = Path(__file__).resolve().parents[2] / "grids"


@pytest.fixture(scope="module")
def setup():
    gen = build_generator("dcgan32", output_size=SIZE, seed=0)
    victim = build_victim("convnet", num_classes=6, image_size=SIZE, width=4, seed=0)
    rng = torch.Generator().manual_seed(1)
    tasks = []
    for i in range(4):  # different theta per task: victims of different seeds
        model = build_victim("convnet", num_classes=6, image_size=SIZE, width=4, seed=10 + i)
        x, y = torch.rand(B, 3, SIZE, SIZE, generator=rng), torch.tensor([i % 6, (i + 1) % 6])
        d = apply_defense(Defense("sparsity", p=0.5), model, x, y, generator=rng)
        masks = [m.float() for m in d.masks]
        tasks.append(GIMLTask(victim_params(model), d.grads, y, masks))
    return gen, victim, tasks


CFG = GIMLConfig(
    tasks_per_step=2, meta_steps=4, latent_iterations=3, inner_steps=2, inner_lr=1e-3, meta_lr=0.5
)


def test_vectorised_task_search_equals_per_task_search(setup):
    gen, victim, tasks = setup
    cost = TaskCost(victim, gen, CFG)
    w = {n: p.detach() for n, p in gen.named_parameters()}
    z0 = torch.randn(3, B, gen.latent_dim, generator=torch.Generator().manual_seed(2))
    stack = stack_tasks(tasks[:3])
    z_all, obj_all = latent_search(lambda z: cost.costs(stack, cost.images(w, z)), z0, CFG)
    for i in range(3):
        one = stack_tasks([tasks[i]])
        z_i, obj_i = latent_search(
            lambda z, one=one: cost.costs(one, cost.images(w, z)), z0[i : i + 1], CFG
        )
        torch.testing.assert_close(z_all[i], z_i[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(obj_all[i], obj_i[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(z_all, z0)  # the search moved


def test_latent_penalty_is_the_unsquared_norm():
    # With zero cost one SGD step on λ Σ_j ‖z_j‖ shrinks every ‖z_j‖ by exactly η·λ, keeping its
    # direction (a squared norm would scale it by 1 − 2ηλ instead).
    config = GIMLConfig(
        latent_iterations=1, latent_optimizer="sgd", latent_lr=0.1, latent_penalty=2.0
    )
    z0 = torch.tensor([[[3.0, 4.0], [0.0, 10.0]]])  # (N=1, B=2, d=2), norms 5 and 10
    z, objective = latent_search(lambda z: z.sum(dim=(1, 2)) * 0.0, z0, config)
    norms = torch.linalg.vector_norm(z, dim=-1)
    torch.testing.assert_close(norms, torch.tensor([[5.0 - 0.2, 10.0 - 0.2]]))
    torch.testing.assert_close(z / norms[..., None], z0 / z0.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(objective, torch.tensor([2.0 * (4.8 + 9.8)]))


def test_reptile_update_on_a_quadratic_with_known_answer():
    # Inner loss ½‖w' − c‖² with SGD: w'_τ = c + (1 − α)^τ (w − c); then w ← (1 − β) w + β w'_τ.
    w, c = {"a": torch.tensor([1.0, -2.0])}, torch.tensor([3.0, 0.5])
    alpha, tau, beta = 0.25, 3, 0.4
    w_prime, losses = adapt(
        w, lambda v: 0.5 * (v["a"] - c).pow(2).sum(), steps=tau, lr=alpha, optimizer="sgd"
    )
    expected_prime = c + (1 - alpha) ** tau * (w["a"] - c)
    torch.testing.assert_close(w_prime["a"], expected_prime)
    new = reptile_update(w, w_prime, beta=beta)
    torch.testing.assert_close(new["a"], (1 - beta) * w["a"] + beta * expected_prime)
    assert torch.equal(w["a"], torch.tensor([1.0, -2.0]))  # w itself untouched (w' is a copy)
    assert losses[0] == pytest.approx(0.5 * float((w["a"] - c).pow(2).sum()))


def _train(gen, victim, tasks, config, state=None, stop_after=None):
    cost = TaskCost(victim, gen, config)
    state = state or initial_state(gen, num_tasks=len(tasks), config=config)
    done = []
    return meta_train(
        state,
        cost=cost,
        load=lambda idx: [tasks[i] for i in idx],
        config=config,
        on_step=lambda s: done.append(s.step),
        should_stop=(lambda: len(done) >= stop_after) if stop_after else None,
    )


def test_resume_from_exported_state_is_bit_exact(setup):
    gen, victim, tasks = setup
    straight = _train(gen, victim, tasks, CFG)
    assert straight.step == 4 and len(straight.log) == 4
    half = _train(gen, victim, tasks, CFG, stop_after=2)
    assert half.step == 2
    buffer = io.BytesIO()
    torch.save(half.export(), buffer)
    buffer.seek(0)
    restored = MetaState.restore(torch.load(buffer, weights_only=True), device=torch.device("cpu"))
    resumed = _train(gen, victim, tasks, CFG, state=restored)
    assert resumed.step == 4
    for k, v in straight.weights.items():
        assert torch.equal(v, resumed.weights[k]), k
    assert resumed.log == straight.log
    start = {n: p.detach() for n, p in gen.named_parameters()}
    assert any(not torch.equal(start[k], v) for k, v in straight.weights.items())


def test_every_task_is_used_once_per_pass(setup):
    gen, victim, tasks = setup
    seen: list[int] = []
    config = dataclasses.replace(CFG, meta_steps=2, latent_iterations=1, inner_steps=0)
    cost = TaskCost(victim, gen, config)
    state = initial_state(gen, num_tasks=len(tasks), config=config)

    def load(idx):
        seen.extend(idx)
        return [tasks[i] for i in idx]

    meta_train(state, cost=cost, load=load, config=config)
    assert sorted(seen) == [0, 1, 2, 3]


def test_config_and_task_set_are_checked(setup):
    gen, _, tasks = setup
    with pytest.raises(ConfigError, match="giml.meta_lr"):
        GIMLConfig(meta_lr=1.5)
    with pytest.raises(ConfigError, match="giml.inner_optimizer"):
        GIMLConfig(inner_optimizer="rmsprop")
    with pytest.raises(ConfigError, match="tasks_per_step"):
        initial_state(gen, num_tasks=1, config=CFG)


def _giml_spec(**changes):
    import yaml

    from tasks.giml_spec import GIMLSpec

    body = yaml.safe_load(open(GRIDS / "giml_faces_cpu.yaml").read())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        body[section][field] = value
    return GIMLSpec.model_validate(body)


def test_clients_never_hold_an_evaluation_face():
    from tasks.giml import client_indices, held_out_indices

    spec = _giml_spec()
    held = held_out_indices(spec)
    groups = client_indices(spec)
    assert len(held) == 16 and len(groups) == 20
    flat = [i for g in groups for i in g]
    assert len(set(flat)) == len(flat) == 80 and not set(flat) & held
    with pytest.raises(ConfigError, match="fl.clients"):
        client_indices(_giml_spec(fl__clients=22))  # 88 faces > the 84 not held out


def test_bad_giml_spec_names_the_field(tmp_path):
    from tasks.giml_spec import GIMLSpec, load_yaml_spec

    text = open(GRIDS / "giml_faces_cpu.yaml").read().replace("meta_lr: 0.5", "meta_lr: 2.0")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="giml.meta_lr"):
        load_yaml_spec(path, GIMLSpec)
    path.write_text(text.replace("meta_lr: 2.0", "meta_rate: 0.5"))
    with pytest.raises(ConfigError, match="meta_rate"):
        load_yaml_spec(path, GIMLSpec)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("giml_faces_cpu.yaml", "GIMLSpec"),
        ("giml_faces.yaml", "GIMLSpec"),
        ("prior_photos_cpu.yaml", "PretrainSpec"),
        ("multigrad_cpu.yaml", "MultiGradSpec"),
    ],
)
def test_shipped_giml_grids_validate(name, model):
    from tasks import giml_spec, multigrad

    cls = getattr(giml_spec, model, None) or getattr(multigrad, model)
    spec, _ = giml_spec.load_yaml_spec(GRIDS / name, cls)
    assert spec.name
