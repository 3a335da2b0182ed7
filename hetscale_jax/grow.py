"""Public growth API: spectrum -> plan -> grown variables -> migrated optimizer state.

    spectrum = grow.splitting_spectrum(loss_fn, variables, batch, rng=key)
    plan = grow.select(spectrum, budget=100_000, threshold=0.0)
    variables = grow.grow(variables, plan, spectrum, mode="exact")
    opt_state = grow.migrate_opt_state(tx, opt_state, variables["params"])

Works on any linen model built from GrowableDense. Growing never resizes an existing array:
each event adds a stage of units (docs/method.md, "The unit") to the chosen layers, so every existing
parameter and its optimizer moments carry over unchanged.
"""

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import layers
from hetscale_jax.splitting import Spectrum, splitting_spectrum  # noqa: F401  (public API)

RULES = ("splitting", "random", "uniform", "first_order")
MODES = ("exact", "split")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which neurons of which layers get a unit at one growth event."""
  indices: dict[str, np.ndarray]  # layer path -> sorted neuron indices
  direction: str                  # "eigvec": r along the eigenvector; "random": the scored random r
  rule: str
  num_params: int                 # parameters the plan adds

  def counts(self) -> dict[str, int]:
    return {p: len(i) for p, i in self.indices.items()}


def unit_cost(spectrum: Spectrum) -> int:
  """Parameters of one unit in this layer: r has d_in + 1 entries, a one."""
  return spectrum.eigvecs.shape[-1] + 1


def _normalised_scores(spectrum: dict[str, Spectrum], rule: str) -> dict[str, np.ndarray]:
  """Per-neuron scores, lower is better, comparable across layers of different input scale.

  S scales with |x~|^2, so dividing by the layer's mean |x~|^2 makes eigenvalues of layers
  with small and large inputs comparable (a unit's r is scaled by the same factor in grow).
  """
  scores = {}
  for path, s in spectrum.items():
    value = _normalised_curvature(s, random_direction=rule == "first_order")
    scores[path] = -np.abs(value) if rule == "first_order" else value
  return scores


def _normalised_curvature(s: Spectrum, random_direction: bool) -> np.ndarray:
  """Per neuron, r^T S r / |r|^2 over the layer's mean |x~|^2: the smallest eigenvalue, or the
  Rayleigh quotient of the random Lanczos start."""
  value = s.start_rayleigh if random_direction else s.eigvals
  return np.asarray(value, np.float64) / float(s.input_scale)


def _greedy_fill(candidates, budget, costs, caps):
  """Takes (path, neuron) in order while each fits the remaining budget and its layer's cap."""
  chosen = {p: [] for p in costs}
  remaining = budget
  for path, neuron in candidates:
    if costs[path] <= remaining and len(chosen[path]) < caps[path]:
      chosen[path].append(neuron)
      remaining -= costs[path]
  return chosen


def select(spectrum: dict[str, Spectrum], budget: int, threshold: float = 0.0, *,
           rule: str = "splitting", max_layer_fraction: float = 0.25,
           rng: np.random.Generator | int | None = None) -> Plan:
  """Chooses neurons to grow within `budget` parameters.

  rule="splitting" (the paper): neurons whose normalised eigenvalue is below `threshold`,
    most negative per parameter first.
  rule="random": uniformly random neurons, no threshold.
  rule="uniform": rounds over the layers, each taking its next most negative neuron (no
    threshold): equal unit counts per layer while budget and caps allow, no choice of where.
  rule="first_order": largest |dL/da| for a random r (the Rayleigh quotient at the random
    Lanczos start), no threshold; the units then use that random r.
  Every rule takes at most max_layer_fraction of one layer's neurons per event.
  """
  if rule not in RULES:
    raise ValueError(f"rule={rule!r}: choose one of {RULES}")
  if budget < 0:
    raise ValueError(f"budget={budget}: must be >= 0 parameters")
  if not 0.0 < max_layer_fraction <= 1.0:
    raise ValueError(f"max_layer_fraction={max_layer_fraction}: must be in (0, 1]")
  costs = {p: unit_cost(s) for p, s in spectrum.items()}
  caps = {p: int(max_layer_fraction * s.eigvals.shape[0]) for p, s in spectrum.items()}
  scores = _normalised_scores(spectrum, rule)
  paths = sorted(spectrum)

  if rule == "uniform":
    # Rounds over the layers, each giving its next most negative neuron: equal unit counts
    # per layer for as long as budget and caps allow.
    ranked = {p: np.argsort(scores[p], kind="stable") for p in paths}
    ordered = [(p, ranked[p][k]) for k in range(max(map(len, ranked.values()), default=0))
               for p in paths if k < len(ranked[p])]
  else:
    candidates = [(p, j) for p in paths for j in range(len(scores[p]))]
    if rule == "random":
      order = np.random.default_rng(rng).permutation(len(candidates))
    else:
      if rule == "splitting":
        candidates = [(p, j) for p, j in candidates if scores[p][j] < threshold]
      order = np.argsort([scores[p][j] / costs[p] for p, j in candidates], kind="stable")
    ordered = [candidates[i] for i in order]
  chosen = _greedy_fill(ordered, budget, costs, caps)

  indices = {p: np.sort(np.asarray(chosen[p], np.int32)) for p in paths if chosen[p]}
  return Plan(indices=indices, direction="random" if rule == "first_order" else "eigvec",
              rule=rule, num_params=sum(len(i) * costs[p] for p, i in indices.items()))


def grow(variables, plan: Plan, spectrum: dict[str, Spectrum], mode: str = "exact",
         unit_scale: float = 1.0):
  """New variables with one stage of units on the plan's neurons (pure function).

  Each unit gets r = unit_scale * v / sqrt(mean |x~|^2), with v the neuron's eigenvector (or
  its scored random direction), so |r . x~| is about unit_scale whatever the layer's input
  scale. mode="exact": a = 0, the function is unchanged and dL/da = 1/2 |r|^2 lambda.
  mode="split": a = 1, the splitting step; the loss moves by about 1/2 |r|^2 lambda per unit.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: choose one of {MODES}")
  kernels = traverse_util.flatten_dict(variables["params"], sep="/")
  stages = {}
  for path, neurons in plan.indices.items():
    if f"{path}/kernel" not in kernels:
      raise KeyError(f"plan names layer {path!r}, which is not in the params")
    dtype = kernels[f"{path}/kernel"].dtype
    s = spectrum[path]
    directions = s.start_dirs if plan.direction == "random" else s.eigvecs
    r = (jnp.asarray(directions)[neurons] * (unit_scale / jnp.sqrt(s.input_scale))).astype(dtype)
    a = jnp.full((len(neurons),), 1.0 if mode == "split" else 0.0, dtype)
    stages[path] = (r, a, jnp.asarray(neurons, jnp.int32))
  return layers.add_unit_stages(variables, stages)


def predicted_split_change(plan: Plan, spectrum: dict[str, Spectrum],
                           unit_scale: float = 1.0) -> float:
  """The second-order loss change of growing `plan` in split mode: the sum over its units of
  1/2 |r|^2 r^T S r / |r|^2, i.e. 1/2 unit_scale^2 / input_scale times the neuron's smallest
  eigenvalue (or, for random directions, the Rayleigh quotient of its random start)."""
  random_direction = plan.direction == "random"
  return 0.5 * unit_scale**2 * sum(
      float(np.sum(_normalised_curvature(spectrum[path], random_direction)[neurons]))
      for path, neurons in plan.indices.items())


def migrate_opt_state(tx, opt_state, new_params):
  """The optimizer state for grown params: every leaf of the old state is kept bit for bit,
  every new leaf is what `tx.init` gives it.

  With `hetscale_jax.optim.adamw` (per-parameter step counts) a new parameter thus starts at
  count 0 with zero moments, and its first update is exactly a fresh Adam step. With stock
  optax Adam the shared step count is kept, the bias correction of the new moments is
  already ~1, and under a steady gradient their k-th step is (1 - b1^k) / sqrt(1 - b2^k) times
  too large (3.2x at the first, about 6.6x around the twelfth).
  """
  old = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(opt_state)[0]}

  def keep_old(path, fresh):
    prev = old.get(jax.tree_util.keystr(path))
    return prev if prev is not None and jnp.shape(prev) == jnp.shape(fresh) else fresh
  return jax.tree_util.tree_map_with_path(keep_old, tx.init(new_params))
