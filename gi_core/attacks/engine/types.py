"""What the engine works on and hands back: the problem, the configs every method shares, the
stages an attack is made of, the description of one attack's stages (`StagesCall`), progress
reports and results. No computation here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from gi_core.attacks.colour import COLOURS
from gi_core.errors import ConfigError
from gi_core.fedavg import Protocol
from gi_core.gradients import BNStats
from gi_core.objectives import DISTANCES, TV_FORMS

Variables = dict[str, Tensor]
LABEL_MODES = ("given", "idlg", "yin", "count")
PATHS = ("auto", "vmap", "loop")
CostFn = Callable[[Tensor], Tensor]  # images (rows, B, C, H, W) in [0, 1] -> costs (rows,)
# Fields that leave a cell's identity unchanged at their default (see tasks.cells): options
# added after cells were stored, which change nothing unless turned on.
OPTIONAL = {"omit_if_default": True}


@dataclass(frozen=True)
class InversionProblem:
    """Everything the attacker knows: θ (the victim), the observed gradient g, the labels, and
    for "+BN" attacks the batch's BN statistics. `masks` come with the sparsity defense.
    `protocol` (None: FedSGD, the paper's) says what `target` is when the server sees a FedAvg
    update or an aggregate of clients (gi_core.fedavg.Protocol); the cost then compares the
    candidate's simulated observation with it."""

    victim: nn.Module
    target: list[Tensor]
    labels: Tensor
    image_shape: tuple[int, int, int]
    masks: list[Tensor] | None = None
    bn_target: BNStats | None = None
    protocol: Protocol | None = None

    @property
    def simulated(self) -> bool:
        """True when the cost must simulate the protocol (anything but one FedSGD gradient)."""
        return self.protocol is not None and not self.protocol.is_fedsgd

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class BaseConfig:
    """Fields every method shares. Regularisers are off unless their weight is set (the BN
    prior is enabled only by the "+bn" methods — never silently).

    `prune_at`: fractions of each stage's iterations at which the worse half of the surviving
    restarts (by current cost) stops being optimised (successive halving; pruned restarts keep
    their images and still compete in the final argmin). `plateau_window` > 0: the last stage
    stops once the best cost has not improved by a relative `plateau_tol` for that many
    iterations. Both are off by default."""

    restarts: int = 4
    distance: str = "cosine"
    tv: float = 1e-4
    tv_form: str = "interior"  # interior (Geiping et al.'s code) | zero_pad (see objectives)
    bn: float = 0.0
    # Adam on sign(∇) instead of ∇, as inversefed and the official GIAS code do for pixels.
    signed_grad: bool = False
    curve_every: int = 10
    labels: str = "given"  # given (the paper's threat model) | idlg (B = 1) | yin | count (repeats)
    # Which preset the values came from (registry.PRESETS); a label stored with the cell so that
    # tuned and paper settings are never mistaken for each other. It changes no computation.
    preset: str = "paper"
    prune_at: tuple[float, ...] = field(default=(), metadata=OPTIONAL)
    plateau_window: int = field(default=0, metadata=OPTIONAL)
    plateau_tol: float = field(default=1e-3, metadata=OPTIONAL)
    # The data's colour model (gi_core.attacks.colour): gray = one-channel reconstructions.
    # Threat-model knowledge the grid sets for every method from `data.colour`.
    colour: str = field(default="rgb", metadata=OPTIONAL)
    # Where tuned values were tuned (canonical JSON: grid, data, victim, budget, and which of
    # those differ from the grid running them; tasks.spec.mark_provenance). It changes no
    # computation; "" for values not tuned (the paper's).
    tuned_on: str = field(default="", metadata=OPTIONAL)

    def __post_init__(self) -> None:
        for name in ("restarts", "curve_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("tv", "bn", "plateau_window", "plateau_tol"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(self.distance in DISTANCES, "distance", f"must be one of {DISTANCES}", self.distance)
        _check(self.tv_form in TV_FORMS, "tv_form", f"must be one of {TV_FORMS}", self.tv_form)
        _check(self.labels in LABEL_MODES, "labels", f"must be one of {LABEL_MODES}", self.labels)
        _check(self.colour in COLOURS, "colour", f"must be one of {COLOURS}", self.colour)
        prune = tuple(float(f) for f in self.prune_at)  # YAML gives a list; keep it hashable
        ok = all(0 < f < 1 for f in prune) and list(prune) == sorted(set(prune))
        _check(ok, "prune_at", "must be increasing fractions in (0, 1)", self.prune_at)
        object.__setattr__(self, "prune_at", prune)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"params.{name}: {rule} (got {value!r})")


@dataclass(frozen=True)
class Stage:
    """One optimisation stage. `start` maps the previous stage's variables to this stage's
    (the first stage gets the attack's initial variables); `render` maps variables to images
    (rows, B, C, H, W) in [0, 1]; `project` runs in place after each step (e.g. box [0, 1]).

    `candidate`: the images this stage ends with compete with the last stage's in the final
    choice, row by row, by the attack's own cost (GIFD keeps its best layer, Fang et al. 2023
    Sec. 3.3); off for every other method, whose result is the last stage's images."""

    name: str
    iterations: int
    lr: float
    trainable: tuple[str, ...]
    render: Callable[[Variables], Tensor]
    start: Callable[[Variables], Variables] = lambda v: v
    project: Callable[[Variables], None] | None = None
    candidate: bool = False


@dataclass(frozen=True)
class Progress:
    stage: str
    iteration: int  # global, over all stages
    total: int
    best_cost: float
    export_state: Callable[[], dict[str, Any]]  # snapshots the loop when called: call it inside
    # the callback (e.g. to checkpoint every k iterations); the state resumes after `iteration`
    # Renders the current images (R, B, C, H, W) in [0, 1] when called (e.g. intermediate
    # snapshots for figures); rendering costs a generator forward pass, so only on demand.
    render: Callable[[], Tensor] | None = None


@dataclass
class AttackResult:
    """`images` (B, C, H, W) in [0, 1] are the chosen restart's images after the last step."""

    images: Tensor
    restart_images: Tensor  # (R, B, C, H, W)
    restart_costs: Tensor  # (R,) final cost of each restart, evaluated on its final images
    best_restart: int  # -1 when every restart diverged
    loss_curve: Tensor  # (points, R); NaN for restarts pruned before that point
    curve_iterations: Tensor  # (points,) global iteration of each curve point
    status: str  # ok | diverged | interrupted
    iterations: int  # iterations run, over all stages
    state: dict[str, Any] | None = None  # set when interrupted: pass back as `state=` to resume
    extras: dict[str, Any] = field(default_factory=dict)  # restart_iterations, path


@dataclass(frozen=True)
class StagesCall:
    """The description of one attack on one problem: its stages, problem, config and initial
    variables (rows = its R restarts), plus a state to resume and its callbacks. Attacks build
    it (`describe` in each attack module); the engine solves it alone (`solve`) or with others
    of the same layout (`solve_batch`)."""

    stages: Sequence[Stage]
    problem: InversionProblem
    config: BaseConfig
    initial: Variables
    state: dict[str, Any] | None = None
    progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None
