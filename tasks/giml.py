"""GIML pipeline work (docs/giml.md): load -> one gi_core call -> save, idempotently.

    <run>/grid.yaml                          the GIML spec (frozen copy)
    <run>/store/tasks/r<round>-c<client>.zarr.zip   one FL report = one inversion task
                                             (defended gradient, labels, mask, ground truth)
    <run>/store/thetas/round-<r>.pt          θ_r of the global model (shared by its reports)
    <run>/store/tasks/index.json             task list, written last (the task set's commit)
    <run>/giml/meta.pt                       meta state after the last finished meta step
    <run>/giml/done.json                     meta-training finished
    <run>/snapshots/...                      generator snapshots + sample grids (storage)
    <run>/prior/                             the wrong prior's pretraining run (same layout)
    <run>/eval/<label>/                      ordinary evaluation grids, one per generator

Meta-training and GAN pretraining are each ONE long job (`run_training`): it checkpoints after
every meta step (GAN: every `checkpoint_every` steps and on preemption), publishes snapshots
first and the checkpoint second, and calls the preemption safe point after both, so USR2
requeues and SIGKILL + rerun both continue from the last finished step.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gi_core.datasets import dataset_info, load_images
from gi_core.errors import ConfigError
from gi_core.fl import ClientBatch, FLConfig, FLReport, simulate_fedsgd
from gi_core.gan_training import GANTraining
from gi_core.generators import Generator, build_generator
from gi_core.giml import GIMLTask, MetaState, TaskCost, generator_state, initial_state, meta_train
from gi_core.gradients import ParamIndex
from storage.atomic import publishing, write_bytes_atomic
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.generator_snapshots import grid_image_path, save_snapshot
from storage.run import RunDir
from storage.zarr_store import StoredGradient, read_gradient, write_gradient
from tasks.cells import expand
from tasks.giml_spec import GIMLSpec, PretrainSpec, PriorSpec
from tasks.models import victim_model
from tasks.spec import MethodSpec, parse_spec
from tasks.work import NoPreemption, Preemption, device

SAMPLE_SEED, SAMPLE_COUNT = 1234, 64  # the fixed z of every sample grid (Figure 6a)


# --- data split -----------------------------------------------------------------------------


def eval_grid(
    spec: GIMLSpec, *, label: str, generator: dict[str, Any] | None, methods: tuple[MethodSpec, ...]
) -> dict[str, Any]:
    """An ordinary grid spec (tasks.spec) evaluating one generator on the held-out batches."""
    if spec.evaluation is None:
        raise ConfigError("evaluation: the spec has no evaluation section")
    ev = spec.evaluation
    grid: dict[str, Any] = {
        "name": f"{spec.name}-{label}",
        "data": ev.data.model_dump(mode="json", exclude_defaults=True),
        "victim": spec.victim.model_dump(mode="json", exclude_defaults=True),
        "methods": [m.model_dump(mode="json", exclude_defaults=True) for m in methods],
        "defenses": [d.model_dump(mode="json", exclude_none=True) for d in ev.defenses],
        "batch_sizes": list(ev.batch_sizes),
        "seeds": list(ev.seeds),
        "execution": spec.execution.model_dump(mode="json", exclude_defaults=True),
    }
    if generator is not None:
        grid["generator"] = generator
    return grid


def held_out_indices(spec: GIMLSpec) -> set[int]:
    """Sample indices of every evaluation batch: no client may hold one of them."""
    if spec.evaluation is None:
        return set()
    grid = eval_grid(spec, label="held-out", generator=None, methods=(MethodSpec(name="gi-x"),))
    return {i for cell in expand(parse_spec(grid)).gradient_cells for i in cell.indices}


def client_indices(spec: GIMLSpec) -> list[tuple[int, ...]]:
    """M disjoint client batches of B from the samples not held out for evaluation."""
    if spec.evaluation is not None and spec.evaluation.data.dataset != spec.data.dataset:
        held: set[int] = set()  # a different data set: nothing to hold out
    else:
        held = held_out_indices(spec)
    n = dataset_info(spec.data.dataset, image_size=spec.data.image_size).num_samples
    free = [i for i in range(n) if i not in held]
    b, m = spec.fl.batch_size, spec.fl.clients
    if len(free) < m * b:
        raise ConfigError(
            f"fl.clients: {m} clients x {b} images need {m * b} samples, but "
            f"{spec.data.dataset!r} has only {len(free)} outside the {len(held)} held-out "
            "evaluation images; lower fl.clients or fl.batch_size"
        )
    return [tuple(free[k * b : (k + 1) * b]) for k in range(m)]


# --- task set -------------------------------------------------------------------------------


def giml_victim(spec: GIMLSpec) -> nn.Module:
    classes = dataset_info(spec.data.dataset, image_size=spec.data.image_size).num_classes
    model = victim_model(spec.victim, num_classes=classes, image_size=spec.data.image_size)
    return model.to(device())


def tasks_index_path(run: RunDir) -> Path:
    return run.tasks_index


def task_path(run: RunDir, task_id: str) -> Path:
    return run.task_path(task_id)


def theta_path(run: RunDir, round: int) -> Path:
    return run.theta_path(round)


def generate_task_set(run: RunDir, spec: GIMLSpec) -> int:
    """Simulate FedSGD and store every report as a task; returns the number of tasks written
    (0 when the task set is already committed). The simulation is sequential (θ_r depends on
    every earlier report), so an interrupted one is redone whole: it is deterministic."""
    if tasks_index_path(run).is_file():
        return 0
    groups = client_indices(spec)
    dev = device()
    clients = []
    for indices in groups:
        images, labels = load_images(spec.data.dataset, indices, image_size=spec.data.image_size)
        clients.append(ClientBatch(images.to(dev), labels.to(dev)))
    victim = giml_victim(spec)
    index, written = ParamIndex.of(victim), []

    def store(report: FLReport) -> None:
        if report.client == 0:
            save_checkpoint(theta_path(run, report.round), report.theta)
        task_id = f"r{report.round:03d}-c{report.client:04d}"
        obs, batch = report.observed, clients[report.client]
        mask = None if obs.masks is None else index.flatten(obs.masks).bool().cpu().numpy()
        task = {
            "round": report.round,
            "client": report.client,
            "indices": list(groups[report.client]),
            "theta": theta_path(run, report.round).name,
        }
        write_gradient(
            task_path(run, task_id),
            StoredGradient(
                gradient=index.flatten(obs.grads).cpu().numpy(),
                param_names=index.names,
                param_shapes=index.shapes,
                images=batch.images.cpu().numpy(),  # ground truth: evaluation only, never attacked
                labels=batch.labels.cpu().numpy(),
                mask=mask,
                attrs={"task": task},
            ),
        )
        written.append(task_id)

    fl = spec.fl
    simulate_fedsgd(
        victim,
        clients,
        FLConfig(rounds=fl.rounds, lr=fl.lr, seed=fl.seed),
        defense=fl.defense.expand()[0],
        on_report=store,
    )
    body = {
        "tasks": written,
        "clients": len(groups),
        "rounds": fl.rounds,
        "client_indices": [list(g) for g in groups],
    }
    write_bytes_atomic(tasks_index_path(run), json.dumps(body).encode())
    return len(written)


class TaskSet:
    """The stored tasks of a run as gi_core GIMLTasks on `dev` (θ_r cached per round)."""

    def __init__(self, run: RunDir, dev: torch.device) -> None:
        self.run, self.dev = run, dev
        self.ids: list[str] = json.loads(tasks_index_path(run).read_text())["tasks"]

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cache  # noqa: B019 - one TaskSet per job; tasks are small and reused every pass
    def _theta(self, round: int) -> dict[str, Tensor]:
        state = load_checkpoint(theta_path(self.run, round)) or {}
        return {k: v.to(self.dev) for k, v in state.items()}

    @functools.cache  # noqa: B019
    def task(self, i: int) -> GIMLTask:
        stored = read_gradient(task_path(self.run, self.ids[i]))
        index = ParamIndex(stored.param_names, stored.param_shapes)
        grads = index.unflatten(torch.as_tensor(stored.gradient, device=self.dev))
        masks = None
        if stored.mask is not None:
            flat = torch.as_tensor(stored.mask, device=self.dev).to(torch.float32)
            masks = index.unflatten(flat)
        labels = torch.as_tensor(stored.labels, device=self.dev)
        round_ = int(stored.attrs["task"]["round"])
        return GIMLTask(self._theta(round_), grads, labels, masks)

    def load(self, picked: list[int]) -> list[GIMLTask]:
        return [self.task(i) for i in picked]


# --- long training jobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """One job element: meta-train (`giml`) or pretrain (`prior`) the run at `run_dir`."""

    run_dir: str
    kind: str  # giml | prior
    threads: int | None = None


def done_path(run: RunDir, kind: str) -> Path:
    return run.training_done(kind)


def state_path(run: RunDir, kind: str) -> Path:
    return run.training_state(kind)


def run_training(job: TrainJob, preemption: Preemption | None = None) -> int:
    """Train to the end (or to a preemption); returns the number of steps run."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    run, preemption = RunDir(Path(job.run_dir)), preemption or NoPreemption()
    if done_path(run, job.kind).is_file():
        return 0
    if job.kind == "giml":
        return _train_giml(run, preemption)
    return _train_prior(run, preemption)


def _publish(run: RunDir, step: int, gen: Generator, state: dict[str, Tensor], source: str) -> None:
    """Snapshot file + index, then its sample grid from the fixed latents."""
    save_snapshot(
        run.root,
        step,
        state,
        meta={"kind": gen.kind, "source": source, "output_size": gen.output_size},
    )
    render = build_generator(gen.kind, output_size=gen.output_size, state_dict=state)
    z = torch.randn(
        (SAMPLE_COUNT, render.latent_dim), generator=torch.Generator().manual_seed(SAMPLE_SEED)
    )
    with torch.no_grad():
        images = render(z)  # (64, 3, S, S) in [0, 1]
    save_image_grid(images, grid_image_path(run.root, step))


def save_image_grid(images: Tensor, path: Path, *, nrow: int = 8) -> None:
    from torchvision.utils import save_image

    with publishing(path) as tmp:
        save_image(images.cpu(), tmp, nrow=nrow, format="png")


def _train_giml(run: RunDir, preemption: Preemption) -> int:
    spec = GIMLSpec.model_validate(_yaml(run))
    config, dev, steps = spec.giml.config(), device(), set(spec.giml.snapshot_steps())
    gen = build_generator(
        spec.giml.generator, output_size=spec.data.image_size, seed=spec.giml.generator_seed
    ).to(dev)
    tasks = TaskSet(run, dev)
    cost = TaskCost(giml_victim(spec), gen, config)
    saved = load_checkpoint(state_path(run, "giml"))
    if saved is not None:
        state = MetaState.restore(saved, device=dev)
    else:
        state = initial_state(gen, num_tasks=len(tasks), config=config)
        if 0 in steps:
            _publish(run, 0, gen, generator_state(gen, state.weights), "giml")
    start = state.step

    def on_step(s: MetaState) -> None:
        if s.step in steps:  # snapshot first: a crash after it only repeats the step
            _publish(run, s.step, gen, generator_state(gen, s.weights), "giml")
        save_checkpoint(state_path(run, "giml"), s.export())
        preemption.safe_point()

    state = meta_train(state, cost=cost, load=tasks.load, config=config, on_step=on_step)
    _finish(run, "giml", {"steps": state.step, "log": state.log})
    return state.step - start


def _train_prior(run: RunDir, preemption: Preemption) -> int:
    prior = PretrainSpec.model_validate(_yaml(run)).prior
    config, dev, steps = prior.config(), device(), set(prior.snapshot_steps())
    n = dataset_info(prior.dataset, image_size=prior.image_size).num_samples
    images, _ = load_images(prior.dataset, list(range(n)), image_size=prior.image_size)
    gen = build_generator(
        prior.generator, output_size=prior.image_size, seed=prior.generator_seed
    ).to(dev)
    training = GANTraining(gen, images.to(dev), config)
    saved = load_checkpoint(state_path(run, "prior"))
    if saved is not None:
        training.restore(saved)
    elif 0 in steps:
        _publish(run, 0, gen, gen.state_dict(), "gan")
    start = training.step
    while training.step < config.steps:
        training.train_step()
        if training.step in steps:
            _publish(run, training.step, gen, gen.state_dict(), "gan")
        if training.step % prior.checkpoint_every == 0 or preemption.requested:
            save_checkpoint(state_path(run, "prior"), training.export())
        preemption.safe_point()
    save_loss_plot(training.log, run.report_file("gan_losses.png"))
    _finish(run, "prior", {"steps": training.step, "log": training.log})
    return training.step - start


def save_loss_plot(log: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["loss_d"] for e in log], label="D", lw=0.8)
    ax.plot(steps, [e["loss_g"] for e in log], label="G", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE loss")
    ax.legend()
    fig.tight_layout()
    with publishing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _finish(run: RunDir, kind: str, body: dict[str, Any]) -> None:
    write_bytes_atomic(done_path(run, kind), json.dumps(body).encode())


def _yaml(run: RunDir) -> Any:
    import yaml

    return yaml.safe_load(run.spec_text())


def pretrain_spec_text(name: str, prior: PriorSpec, spec: GIMLSpec | PretrainSpec) -> str:
    """The grid.yaml of a prior's run directory (a PretrainSpec)."""
    import yaml

    body = {
        "name": name,
        "prior": prior.model_dump(mode="json"),
        "execution": spec.execution.model_dump(mode="json", exclude_defaults=True),
    }
    return yaml.safe_dump(body, sort_keys=False)
