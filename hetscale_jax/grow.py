"""Public growth API: spectrum -> plan -> grown variables -> migrated optimizer state.

    spectrum = grow.splitting_spectrum(loss_fn, variables, batch, rng=key)
    plan = grow.select(spectrum, budget=100_000, threshold=0.0, rule="splitting", unit="gated")
    variables = grow.grow(variables, plan, spectrum, mode="exact")
    opt_state = grow.migrate_opt_state(tx, opt_state, variables["params"])

Works on any linen model built from GrowableDense. Growing never moves an existing parameter:
each event puts units (docs/method.md, "The unit") into free slots of the chosen layers'
packed unit arrays (layers.py), padding them to the next capacity when full, so every
existing parameter and its optimizer moments carry over unchanged. `reserve_slots` sizes the
arrays for a whole schedule of events before training, so that no event changes a shape.

Three independent choices make a mechanism (docs/method.md, "Selection"):
  rule        how neurons are scored (RULES): the paper's text is "splitting", the authors'
              released code "row_sum";
  unit        what is added (layers.UNIT_KINDS): "gated" (the paper's text) or "linear" (the
              released code);
  allocation  how the budget is shared (ALLOCATIONS): "global" ranking, or "by_kind", equal
              quotas per layer kind (the released code).
Every rule works with every unit and allocation, on one code path.
"""

import collections
from collections.abc import Callable, Mapping
import dataclasses
import warnings

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import layers, sharding
from hetscale_jax.layers import live_units  # noqa: F401  (public API)
from hetscale_jax.models import deit
from hetscale_jax.splitting import Spectrum, checked_key, splitting_spectrum  # noqa: F401  (public API)

RULES = ("splitting", "splitting_abs", "row_sum", "grad_norm", "random", "uniform", "first_order")
# The rules whose candidates are the neurons scoring below the threshold; the others rank all.
THRESHOLD_RULES = ("splitting", "row_sum")
UNITS = tuple(layers.UNIT_KINDS)
ALLOCATIONS = ("global", "by_kind")
# by_kind's default kinds: DeiT's layer names, the released code's four quotas. Another model
# names its own (select's `kinds`).
DEIT_KINDS = {name: name for name in deit.GROWABLE_LAYERS}
MODES = ("exact", "split")
# When a training run sizes its unit slots (growth.slots): "events", each event from its picks,
# with room for the events still to come; "schedule", all before training (reserve_slots).
SLOTS = ("events", "schedule")
# A linear unit starts at p+/- = +/-LINEAR_INIT [w_j, b_j], the neuron's own row, as released.
LINEAR_INIT = 0.2


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which neurons of which layers get a unit at one growth event."""
  indices: dict[str, np.ndarray]  # layer path -> sorted neuron indices
  # Direction r of a gated unit: "eigvec" (smallest eigenvalue's), "extreme" (that of the
  # eigenvalue of larger magnitude) or "random" (the scored random start).
  direction: str
  rule: str
  unit: str                       # layers.UNIT_KINDS
  num_params: int                 # parameters the plan adds

  def counts(self) -> dict[str, int]:
    return {p: len(i) for p, i in self.indices.items()}


def layer_cap(neurons: int, max_layer_fraction: float) -> int:
  """The most units one event puts on a layer of `neurons` neurons: max_layer_fraction of them,
  and at least one, so that no layer is too small to grow."""
  return max(1, int(max_layer_fraction * neurons))


def layer_kind(path: str) -> str:
  """A layer's name: the last part of its path ("fc1" of "blocks_0/mlp/fc1"), which DEIT_KINDS
  and a `kinds` dict map to kinds."""
  return path.rsplit("/", 1)[-1]


Kinds = Mapping[str, str] | Callable[[str], str | None]


def kind_of(path: str, kinds: Kinds) -> str | None:
  """The kind of the layer at `path` under `kinds`: a function path -> kind (None: no kind), or
  a dict {layer name (layer_kind): kind}; None where it names none."""
  return kinds(path) if callable(kinds) else kinds.get(layer_kind(path))


class EmptyPlanWarning(UserWarning):
  """select chose no neuron; the message says why."""


def spectrum_unit_cost(spectrum: Spectrum, unit: str) -> int:
  """Parameters of one unit of kind `unit` on the layer of `spectrum`."""
  return layers.unit_param_count(unit, spectrum.eigvecs.shape[-1] - 1)


def plan_params(indices: dict[str, np.ndarray], unit: str, spectrum: dict[str, Spectrum]) -> int:
  """Parameters that units of kind `unit` on `indices` add."""
  return sum(len(i) * spectrum_unit_cost(spectrum[p], unit) for p, i in indices.items())


def _largest_is_extreme(s: Spectrum) -> np.ndarray:
  """Per neuron, whether the largest eigenvalue has the larger magnitude of the two ends."""
  return np.abs(np.asarray(s.eigvals_max, np.float64)) > np.abs(np.asarray(s.eigvals, np.float64))


def curvature(s: Spectrum, direction: str) -> np.ndarray:
  """Per neuron, r^T S r / |r|^2 over the layer's mean |x~|^2 for a gated unit's direction r
  (Plan.direction): the loss change of a unit at gain 1 is 1/2 |r|^2 times this."""
  if direction == "random":
    value = np.asarray(s.start_rayleigh, np.float64)
  else:
    value = np.asarray(s.eigvals, np.float64)
    if direction == "extreme":
      value = np.where(_largest_is_extreme(s), np.asarray(s.eigvals_max, np.float64), value)
  return value / float(s.input_scale)


def linear_unit_slope(activation: str) -> float:
  """1 + s'(0): a linear unit's output per unit of q.x~ at insertion."""
  return 1.0 + float(jax.grad(layers.activation_fn(activation))(0.0))


def scores(spectrum: dict[str, Spectrum], rule: str) -> dict[str, np.ndarray]:
  """Per-neuron scores of `rule`, lower is better ("splitting"'s for random and uniform, which
  ignore them).

  Curvatures are divided by the layer's mean |x~|^2, which S scales with, so that layers of
  different input scale compare (a gated unit's r is scaled by the same factor in grow).
  row_sum and grad_norm are the released code's and GradMax's raw gradients.
  """
  out = {}
  for path, s in spectrum.items():
    g = np.asarray(s.gradient, np.float64)
    if rule == "row_sum":       # min(0, sum_k dL/dW_jk): bias column excluded
      out[path] = np.minimum(0.0, g[:, :-1].sum(axis=1))
    elif rule == "grad_norm":   # |dL/dq| of a linear unit at insertion, largest first
      out[path] = -linear_unit_slope(s.activation) * np.linalg.norm(g, axis=1)
    elif rule == "first_order":  # |dL/da| of a gated unit along the random start
      out[path] = -np.abs(curvature(s, "random"))
    elif rule == "splitting_abs":
      out[path] = -np.abs(curvature(s, "extreme"))
    else:
      out[path] = curvature(s, "eigvec")
  return out


def _permutation(rng: jax.Array, n: int) -> np.ndarray:
  return np.asarray(jax.random.permutation(rng, n))


def _ranked(score: dict[str, np.ndarray], costs: dict[str, int], rule: str, threshold: float,
            rng: jax.Array) -> list[tuple[str, int]]:
  """Every candidate (path, neuron) in the order the rule takes them."""
  paths = sorted(score)
  if rule == "uniform":
    # Rounds over the layers, each giving its next neuron of a random order: equal unit
    # counts per layer for as long as budget and caps allow, and no say in which neurons.
    order = {p: _permutation(jax.random.fold_in(rng, i), len(score[p])) for i, p in enumerate(paths)}
    return [(p, int(order[p][k])) for k in range(max(map(len, order.values()), default=0))
            for p in paths if k < len(order[p])]
  candidates = [(p, j) for p in paths for j in range(len(score[p]))]
  if rule == "random":
    return [candidates[i] for i in _permutation(rng, len(candidates))]
  if rule in THRESHOLD_RULES:
    candidates = [(p, j) for p, j in candidates if score[p][j] < threshold]
  order = np.argsort([score[p][j] / costs[p] for p, j in candidates], kind="stable")
  return [candidates[i] for i in order]


def _greedy_fill(candidates, budget, max_units, costs, caps) -> dict[str, list[int]]:
  """Takes (path, neuron) in order while each fits the remaining budget, the unit count and
  its layer's cap."""
  chosen = collections.defaultdict(list)
  remaining, units = budget, 0
  for path, neuron in candidates:
    if units == max_units:
      break
    if costs[path] <= remaining and len(chosen[path]) < caps[path]:
      chosen[path].append(neuron)
      remaining -= costs[path]
      units += 1
  return chosen


def _first_layers_to_qualify(ranked, min_candidates: int, max_layers: int) -> set[str]:
  """The layers whose min_candidates-th candidate comes first in the ranking, at most
  max_layers of them."""
  seen, qualified = collections.Counter(), []
  for path, _ in ranked:
    seen[path] += 1
    if seen[path] == min_candidates:
      qualified.append(path)
      if len(qualified) == max_layers:
        break
  return set(qualified)


def select(spectrum: dict[str, Spectrum], *, budget: int | None = None, threshold: float = 0.0,
           max_units: int | None = None, rule: str = "splitting", unit: str = "gated",
           allocation: str = "global", kinds: Kinds = DEIT_KINDS, max_layer_fraction: float = 0.25,
           min_candidates: int = 1, max_layers_per_kind: int = 3,
           rng: jax.Array | None = None) -> Plan:
  """Chooses neurons to grow within `budget` parameters and/or `max_units` units of kind `unit`
  (at least one of the two; with both, both hold). Every argument but the spectrum is given by
  name: a bare 8 could mean 8 parameters or 8 units.

  rule="splitting" (the paper's text): neurons whose normalised smallest eigenvalue is below
    `threshold`, most negative per parameter first.
  rule="splitting_abs": the largest |eigenvalue|, either end, per parameter (for gated units
    in exact mode, whose gain moves either way); the units use that eigenvalue's vector.
  rule="row_sum" (the released code): min(0, sum_k dL/dW_jk) below `threshold`, most negative
    per parameter first.
  rule="grad_norm": the largest |dL/dq| of a linear unit at insertion, per parameter.
  rule="random": uniformly random neurons, no threshold.
  rule="uniform": rounds over the layers, each taking its next neuron of a random order (no
    criterion, no threshold): equal unit counts per layer while budget and caps allow.
  rule="first_order": largest |dL/da| for a random r (the Rayleigh quotient at the random
    Lanczos start), no threshold; the units then use that random r.

  allocation="global": one ranking over every layer spends the budget. allocation="by_kind":
  the budget (and max_units) is split into equal quotas per layer kind, as `kinds` names them
  (kind_of; default DEIT_KINDS: qkv, proj, fc1, fc2); a layer of no kind gets no quota, with a
  warning. Within a kind, the first max_layers_per_kind layers to have min_candidates
  candidates in the ranking share its quota.
  Every rule takes at most max_layer_fraction of one layer's neurons per event, and at least
  one: a layer too small for the fraction to allow a whole neuron is never shut out.
  `rng` (a JAX key, default key 0) orders the random and uniform rules: the same inputs always
  give the same plan. A plan that grows nothing comes with an EmptyPlanWarning saying why.
  """
  if rule not in RULES:
    raise ValueError(f"rule={rule!r}: choose one of {RULES}")
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r}: choose one of {UNITS}")
  if allocation not in ALLOCATIONS:
    raise ValueError(f"allocation={allocation!r}: choose one of {ALLOCATIONS}")
  if budget is None and max_units is None:
    raise ValueError("give budget (parameters), max_units (units), or both")
  if (budget or 0) < 0 or (max_units or 0) < 0:
    raise ValueError(f"budget={budget}, max_units={max_units}: must be >= 0")
  if not 0.0 < max_layer_fraction <= 1.0:
    raise ValueError(f"max_layer_fraction={max_layer_fraction}: must be in (0, 1]")
  if min_candidates < 1 or max_layers_per_kind < 1:
    raise ValueError(f"min_candidates={min_candidates}, max_layers_per_kind="
                     f"{max_layers_per_kind}: both must be >= 1")
  rng = checked_key(rng, "select")
  limits = (np.inf if budget is None else budget, np.inf if max_units is None else max_units)
  costs = {p: spectrum_unit_cost(s, unit) for p, s in spectrum.items()}
  caps = {p: layer_cap(s.eigvals.shape[0], max_layer_fraction) for p, s in spectrum.items()}
  score = scores(spectrum, rule)
  ranked = _ranked(score, costs, rule, threshold, rng)
  if allocation == "global":
    chosen = _greedy_fill(ranked, *limits, costs, caps)
    quotas, names = limits, None
  else:
    kind = {p: kind_of(p, kinds) for p in spectrum}
    if unknown := sorted(p for p, k in kind.items() if k is None):
      warnings.warn(f"select(allocation='by_kind'): layers {unknown} have no kind in `kinds`, "
                    "so no quota; name them with kinds= (a dict {layer name: kind} or a "
                    "function path -> kind)", stacklevel=2)
    names = sorted({k for k in kind.values() if k is not None})
    quotas = tuple(total if np.isinf(total) else total // max(len(names), 1) for total in limits)
    chosen = {}
    for name in names:
      mine = [(p, j) for p, j in ranked if kind[p] == name]
      eligible = _first_layers_to_qualify(mine, min_candidates, max_layers_per_kind)
      chosen.update(_greedy_fill([(p, j) for p, j in mine if p in eligible], *quotas, costs,
                                 caps))
  indices = {p: np.sort(np.asarray(chosen[p], np.int32)) for p in sorted(chosen) if chosen[p]}
  if not indices:
    warnings.warn(EmptyPlanWarning("select: the plan grows nothing: " + _why_empty(
        score, ranked, costs, unit, rule, threshold, budget, max_units, quotas, names,
        min_candidates)), stacklevel=2)
  direction = {"first_order": "random", "splitting_abs": "extreme"}.get(rule, "eigvec")
  return Plan(indices=indices, direction=direction, rule=rule, unit=unit,
              num_params=plan_params(indices, unit, spectrum))


def _why_empty(score, ranked, costs, unit, rule, threshold, budget, max_units, quotas, names,
               min_candidates) -> str:
  """Why select chose nothing: the first limit that left no neuron. `quotas` are the limits
  (budget, max_units) per kind under by_kind, whose kinds are `names` (None: global)."""
  cheapest = min(costs.values(), default=0)
  # Under by_kind, a limit is first split into quotas per kind.
  gives = (lambda n: " is") if names is None else (lambda n: f" gives {n} per kind,")
  if not costs:
    return "the spectrum has no layer"
  if names == []:
    return "allocation='by_kind' and no layer has a kind in `kinds`"
  if quotas[1] < 1:
    return f"max_units={max_units}{gives(quotas[1])} below one unit"
  if quotas[0] < cheapest:
    return (f"budget={budget} parameters{gives(quotas[0])} below one {unit} unit's {cheapest} "
            "parameters (budget counts parameters; max_units counts units)")
  if not ranked:
    lowest = min(float(np.min(v)) for v in score.values() if len(v))
    return (f"no neuron scores below threshold={threshold} under rule {rule!r} (the lowest "
            f"scores {lowest:.3g})")
  if names is not None:
    return (f"no layer of a kind in `kinds` has min_candidates={min_candidates} candidates, or "
            "fits its kind's quota")
  return "no candidate fits the budget, max_units and the layer caps together"


def _gated_units(s: Spectrum, neurons, direction: str, mode: str, unit_scale: float):
  """(r, a): r = unit_scale * v / sqrt(mean |x~|^2) along the plan's direction; a = 0 (exact)
  or, in split mode, the sign that takes the loss downhill, -sign(r^T S r)."""
  if direction == "random":
    vectors = np.asarray(s.start_dirs)
  else:
    vectors = np.asarray(s.eigvecs)
    if direction == "extreme":
      vectors = np.where(_largest_is_extreme(s)[:, None], np.asarray(s.eigvecs_max), vectors)
  r = vectors[neurons] * (unit_scale / np.sqrt(float(s.input_scale)))
  gain = -np.sign(curvature(s, direction)[neurons]) if mode == "split" else np.zeros(len(neurons))
  return r, gain


def grow(variables, plan: Plan, spectrum: dict[str, Spectrum], mode: str = "exact",
         unit_scale: float = 1.0, reserve_events: int = 0):
  """New variables with units of kind plan.unit added on the plan's neurons (pure).

  Gated units get r = unit_scale * v / sqrt(mean |x~|^2), with v the plan's direction, so
  |r . x~| is about unit_scale whatever the layer's input scale. mode="exact": a = 0, the
  function is unchanged and dL/da = 1/2 |r|^2 r^T S r / |r|^2. mode="split": |a| = 1 with
  the sign that lowers the loss, the splitting step; the loss moves by about -1/2 |r^T S r|
  per unit. Linear units are exact only: p+/- = +/-LINEAR_INIT [w_j, b_j], so q = 0.
  Host work (numpy): nothing compiles, whatever the shapes.
  `reserve_events`: as layers.add_unit_packs (the events still to come in a schedule); with
  any, every layer of the spectrum gets room for units, also one that gets none now.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: choose one of {MODES}")
  if mode == "split" and plan.unit != "gated":
    raise ValueError(f"mode='split' needs gated units; the plan's are {plan.unit!r}")
  params = traverse_util.flatten_dict(layers.checked_variables(variables, "grow")["params"],
                                      sep="/")
  units = {}
  for path, neurons in plan.indices.items():
    if f"{path}/kernel" not in params:
      raise KeyError(f"plan names layer {path!r}, which is not in the params")
    if plan.unit == "gated":
      units[path] = (neurons, *_gated_units(spectrum[path], neurons, plan.direction, mode,
                                            unit_scale))
    else:
      kernel, bias = (np.asarray(sharding.host_value(params[f"{path}/{name}"]))
                      for name in ("kernel", "bias"))
      row = np.concatenate([kernel[:, neurons].T, bias[neurons][:, None]], axis=-1)
      units[path] = (neurons, LINEAR_INIT * row, None)
  if reserve_events:  # a layer first grown by a later event then fits without a recompile
    for path in spectrum.keys() - units.keys():
      width = params[f"{path}/kernel"].shape[0] + 1
      units[path] = (np.zeros(0, np.int32), np.zeros((0, width)),
                     np.zeros(0) if plan.unit == "gated" else np.zeros((0, width)))
  return add_units(variables, units, plan.unit, reserve_events)


def schedule_room(unit: str, events: int, cap: int, d_out: int) -> tuple[int, ...]:
  """The most units each depth of a layer can hold after `events` events of at most `cap`
  units each: a gated unit reaches depth d at the (d+1)-th event that picks its neuron, so
  depth d holds at most cap (events - d) of them, and at most d_out (distinct neurons);
  linear units all sit at depth 0."""
  if unit == "linear":
    return (events * cap,)
  return tuple(min(d_out, cap * (events - d)) for d in range(events))


def reserve_slots(variables, events: int, unit: str = "gated", max_layer_fraction: float = 0.25,
                  layer_filter: Callable[[str], bool] | None = None):
  """New variables in which every GrowableDense layer that `layer_filter` accepts (by path;
  None: every layer with a 2-d kernel, which in a model built from GrowableDense is every
  one) holds empty slots for the most units of kind `unit` that `events` growth events can put
  on it: each adds at most layer_cap of its neurons (select's max_layer_fraction, whose default
  this shares), and a gated unit's depth is at most `events`.
  Growing within such a schedule then never changes a shape: the train step and the spectrum
  compile once, the first compile already has the units' code, and every seed and rule of a
  config shares its programs. Each depth lists schedule_room slots; a step computes the
  shortest prefix of the list that holds its units (layers.bucket_sizes), rematerialised in
  the backward pass."""
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r}: choose one of {UNITS}")
  params = traverse_util.flatten_dict(layers.checked_variables(variables, "reserve_slots")["params"],
                                      sep="/")
  packs = {}
  for key, kernel in params.items():
    path = key[:-len("/kernel")]
    if key.endswith("/kernel") and kernel.ndim == 2 and (layer_filter is None or layer_filter(path)):
      d_in, d_out = kernel.shape
      cap = layer_cap(d_out, max_layer_fraction)
      slots = layers.capacity(events * cap)
      packs[path] = {unit: layers.on_device(layers.empty_pack(
          unit, slots, d_in, kernel.dtype, room=schedule_room(unit, events, cap, d_out)))}
  return layers.set_packs(variables, packs)


def add_units(variables, units: dict, unit: str = "gated", reserve_events: int = 0):
  """New variables with hand-placed units added to each named layer (pure function).

  unit="gated": units {path: (indices [n], directions r [n, d_in+1], gains a [n] or one for
    all)}; with gains 0 (or None) the function is unchanged.
  unit="linear": units {path: (indices [n], p_plus [n, d_in+1], p_minus [n, d_in+1])}; with
    p_minus = -p_plus (or None, which means exactly that) the function is unchanged.
  Each row of a direction is [weights on x, offset]; indices are distinct neuron numbers.
  Arrays are cast to the layer kernel's dtype. grow() is this with the directions a Plan and a
  Spectrum give. Host work (numpy): nothing compiles, whatever the shapes.
  """
  if unit not in UNITS:
    raise ValueError(f"unit={unit!r}: choose one of {UNITS}")
  params = traverse_util.flatten_dict(layers.checked_variables(variables, "add_units")["params"],
                                      sep="/")
  new = {}
  for path, (indices, first, second) in units.items():
    if f"{path}/kernel" not in params:
      raise KeyError(f"units name layer {path!r}, which is not in the params")
    kernel = params[f"{path}/kernel"]
    indices = np.asarray(indices, np.int32)
    if len(np.unique(indices)) != len(indices) or np.any(indices < 0) or np.any(indices >= kernel.shape[1]):
      raise ValueError(f"{path}: indices must be distinct neurons in [0, {kernel.shape[1]})")
    n, row = len(indices), kernel.shape[0] + 1
    first = np.asarray(first, kernel.dtype)
    if unit == "gated":  # a gain for every unit, or one for all (None: 0, the exact unit)
      second = np.asarray(0 if second is None else second, kernel.dtype)
      second = np.full(n, second) if second.ndim == 0 else second
    else:
      second = -first if second is None else np.asarray(second, kernel.dtype)
    expected = ((n, row), (n,) if unit == "gated" else (n, row))
    if (first.shape, second.shape) != expected:
      raise ValueError(f"{path}: {unit} units of {n} neurons need arrays of shapes {expected}, "
                       f"got {(first.shape, second.shape)}")
    if unit == "gated":
      unit_params = {"r": first, "a": second}
    else:
      p = np.stack([first, second], axis=1)
      unit_params = {"w": p[..., :-1], "b": p[..., -1]}
    new[path] = layers.NewUnits(unit, indices, unit_params)
  return layers.add_unit_packs(variables, new, reserve_events)


def predicted_split_change(plan: Plan, spectrum: dict[str, Spectrum],
                           unit_scale: float = 1.0) -> float:
  """The second-order loss change of growing `plan` as gated units in split mode: the sum over
  its units of -1/2 |r|^2 |r^T S r| / |r|^2, i.e. -1/2 unit_scale^2 |curvature| (each unit's
  gain takes the loss downhill)."""
  return -0.5 * unit_scale**2 * sum(
      float(np.sum(np.abs(curvature(spectrum[path], plan.direction)[neurons])))
      for path, neurons in plan.indices.items())


def migrate_opt_state(tx, opt_state, new_params):
  """The optimizer state for grown params: every entry of the old state is kept bit for bit,
  every new one is what `tx.init` gives it. A unit field padded to more slots (layers.py)
  keeps its old slots' state in place.

  With `hetscale_jax.optim.adamw` (step counts per parameter, per slot for unit fields, that
  do not step while a slot is empty) a new unit thus starts at count 0 with zero moments, and
  its first update is exactly a fresh Adam step. With stock optax Adam the shared step count
  is kept, the bias correction of the new moments is already ~1, and under a steady gradient
  their k-th step is (1 - b1^k) / sqrt(1 - b2^k) times too large (3.2x at the first, about
  6.6x around the twelfth).
  """
  if isinstance(new_params, Mapping) and "params" in new_params:
    raise TypeError("migrate_opt_state takes the grown variables['params'], not the variables: "
                    "tx.init of the whole variables would start every entry afresh")
  old = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(opt_state)[0]}

  def keep_old(path, fresh):
    prev = old.get(jax.tree_util.keystr(path))
    if prev is None or jnp.ndim(prev) != jnp.ndim(fresh) or jnp.shape(prev)[1:] != jnp.shape(fresh)[1:]:
      return fresh
    if jnp.shape(prev) == jnp.shape(fresh):
      return prev
    # More slots: the old ones keep their state. On the host, as growing is: an op here would
    # compile for every new shape.
    value = np.array(sharding.host_value(fresh))
    value[:jnp.shape(prev)[0]] = sharding.host_value(prev)
    return jax.device_put(value)
  # One program for the whole fresh state (op by op, every leaf's shape would compile).
  return jax.tree_util.tree_map_with_path(keep_old, jax.jit(tx.init)(new_params))
