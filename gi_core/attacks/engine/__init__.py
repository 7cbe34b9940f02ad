"""The optimisation engine shared by every attack, split along its seams:

- `types`: configs, `InversionProblem`, `Stage`, `StagesCall` (the description of one attack's
  stages), `Progress`, `AttackResult`;
- `cost`: the two cost paths (`vmap`, `loop` with its row-by-row autograd Function), the
  measured `PathPolicy` that picks one, and the exact BN used under vmap;
- `loop`: Adam over the stages with the paper's LR steps, restart pruning, plateau stopping;
- `state`: export and bit-exact resume of the loop state at any iteration boundary;
- `solve`: solving one description (`solve`), several together (`solve_batch`), or stages
  under a caller's cost (`optimise`).

An attack is a sequence of `Stage`s; each attack module's `describe` returns its `StagesCall`,
and its `reconstruct` is `solve(describe(...))`. Batching several cells is the caller's
choice (gi_core.attacks.batched hands their descriptions to `solve_batch`). Every variable
carries a *row* dimension first: the R restarts of one problem, or the P × R restarts of P
problems solved together (problem-major).
"""

from gi_core.attacks.engine.cost import (
    DEFAULT_POLICY,
    PathPolicy,
    choose_path,
    exact_batchnorm_,
    make_batch_cost,
)
from gi_core.attacks.engine.loop import milestones, prune_iterations
from gi_core.attacks.engine.solve import optimise, run_stages, solve, solve_batch
from gi_core.attacks.engine.types import (
    LABEL_MODES,
    OPTIONAL,
    PATHS,
    AttackResult,
    BaseConfig,
    CostFn,
    InversionProblem,
    Progress,
    Stage,
    StagesCall,
    Variables,
    _check,
)

__all__ = [
    "DEFAULT_POLICY",
    "LABEL_MODES",
    "OPTIONAL",
    "PATHS",
    "AttackResult",
    "BaseConfig",
    "CostFn",
    "InversionProblem",
    "PathPolicy",
    "Progress",
    "Stage",
    "StagesCall",
    "Variables",
    "_check",
    "choose_path",
    "exact_batchnorm_",
    "make_batch_cost",
    "milestones",
    "optimise",
    "prune_iterations",
    "run_stages",
    "solve",
    "solve_batch",
]
