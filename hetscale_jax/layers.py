"""GrowableDense: a linear layer that carries skip-connected units (docs/method.md, "The unit").

Two kinds of unit, on neuron j with output z_j (earlier units included) and x~ = [x, 1]:

    gated:   y_j = z_j + a * (1/2 s(z_j + r.x~) + 1/2 s(z_j - r.x~) - s(z_j))
    linear:  y_j = z_j + s(q.x~) - s(0) + q.x~,   q = p+ + p-

The gated unit is the paper's text: exact at a = 0, where dL/da is second order in r. The
linear unit is the authors' released one: exact at p+ = -p-, and its gradient at insertion is
first order, (1 + s'(0)) dL/dy_j x~. The layer reads its units from the variables it is given,
so a model built from GrowableDense never changes its code when it grows.

Every unit of one kind on one layer lives in one packed set of arrays, whatever the growth
event that added it; each depth lists the slots of its units:

    gated   params/<layer>/gated_r        [C, d_in + 1]  direction of each unit slot
            params/<layer>/gated_a        [C]            output gain
    linear  params/<layer>/linear_w       [C, 2, d_in]   p+ and p-, weights
            params/<layer>/linear_b       [C, 2]         p+ and p-, offsets
    both    growth/<layer>/<kind>_index     [C] int32      neuron each slot sits on
            growth/<layer>/<kind>_depth_<d> [L_d] int32    the slots of the units at depth d
            growth/<layer>/<kind>_held      [D] int32      units each depth holds (with room)

A gated unit at depth d reads its neuron's output after the units at depths < d: a neuron grown
twice gets its second unit on top of its first. The units of one depth sit on distinct neurons,
so each depth is one gather and one scatter (or their one-hot matmuls: `dispatch`). Linear
units do not read z_j, so they all sit at depth 0, applied before the gated ones.

A depth computes only the slots its list names, their parameters gathered from the pack: its
cost is its own units', not the layer's capacity. Its list is exactly as long as its units
(the train step compiles anew when an event adds some), except in a pack with room
(grow.reserve_slots: a schedule's slots held from the start, one program for every event),
whose lists are padded with C (no slot) and which counts the units each depth holds; a step
then computes the shortest prefix of bucket_sizes that holds them, rematerialised in the
backward pass so that the prefixes not taken keep no residuals. Slots never move, so their
optimizer state does not; capacities C are padded to a ladder of sizes (`capacity`), and only
the parameters' memory pays for empty slots.
A slot that holds no unit is exactly inert: its parameters are zero, it is in no depth's list
(so it computes nothing and gets no gradient), it is not counted as a parameter, and
optim.adamw neither steps nor decays it.

This module owns the unit variables' names, shapes, parameter counts and packed layout
(`UnitPack`, `add_unit_packs`); it knows nothing about how units are chosen.
"""

from collections.abc import Callable, Mapping
import functools
import math
from typing import Any, NamedTuple

from flax import traverse_util
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import sharding


def exact_gelu(v: jax.Array) -> jax.Array:
  """s(v) = v/2 (1 + erf(v/sqrt 2)), the exact GELU, as the DeiT MLP's to rounding.

  Not jax.nn.gelu's v/2 erfc(-v/sqrt 2): JAX expands erfc into two branches of exps and
  divisions, where XLA computes erf as one op, so the units' train step costs a fifth less on
  CPU (BENCHMARKS.md). The price is relative accuracy where the GELU is tiny: 1 + erf cancels
  for v < -3, leaving Phi an absolute error of about one rounding of 1 (2e-7 in float32)."""
  return 0.5 * v * (1 + lax.erf(v * math.sqrt(0.5)))


# Unit nonlinearities s. The exact GELU matches the DeiT MLP and is the default.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": exact_gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}

GROWTH_COLLECTION = "growth"
# Intermediates collection where every grown layer sows its units' mean |contribution| per
# neuron (hetscale_jax.ablation); nothing is computed unless it is asked for as mutable.
CONTRIBUTION = ("intermediates", "unit_contribution")
# The parameter fields of each unit kind, in the order add_units takes them; the first is
# decayed like a kernel. Kinds apply in this order: linear units before gated ones read z_j.
UNIT_KINDS = {"linear": ("w", "b"), "gated": ("r", "a")}
INDEX, DEPTH, HELD = "index", "depth", "held"
MIN_CAPACITY = 8


def _check_kind(kind: str):
  if kind not in UNIT_KINDS:
    raise ValueError(f"unknown unit kind {kind!r}; choose one of {sorted(UNIT_KINDS)}")


def param_name(kind: str, field: str) -> str:
  """"gated_r": the name of a unit field, in params (fields of UNIT_KINDS) or in the growth
  collection (INDEX, AT_DEPTH)."""
  return f"{kind}_{field}"


def capacity(num_units: int) -> int:
  """Slots that hold `num_units` units: the next of MIN_CAPACITY x 1, 1.5, 2, 3, 4, 6, ...
  (powers of two and the points halfway between): at most 1.5x the units, in few shapes."""
  slots = MIN_CAPACITY
  while slots < num_units:
    slots = slots * 3 // 2 if slots & (slots - 1) == 0 else slots * 4 // 3
  return slots


def unit_shapes(kind: str, slots: int, d_in: int) -> dict[str, tuple[int, ...]]:
  """{field: shape} of `slots` unit slots of `kind` on a layer with d_in inputs; the slot axis
  is always the first (optim.adamw counts steps per slot along it)."""
  _check_kind(kind)
  if kind == "gated":
    return {"r": (slots, d_in + 1), "a": (slots,)}
  return {"w": (slots, 2, d_in), "b": (slots, 2)}


def unit_param_count(kind: str, d_in: int) -> int:
  """Parameters of one unit: d_in + 2 for gated (r and a), 2 (d_in + 1) for linear (p+, p-)."""
  return sum(math.prod(shape) for shape in unit_shapes(kind, 1, d_in).values())


def _kind_of(name: str) -> str | None:
  """The unit kind of a parameter name ("gated_r" -> "gated"), None for other parameters."""
  for kind, fields in UNIT_KINDS.items():
    if name in {param_name(kind, f) for f in fields}:
      return kind
  return None


def is_unit_param(name: str) -> bool:
  """Whether a parameter name is a unit field: its first axis is the unit slots."""
  return _kind_of(name) is not None


def is_unit_direction(name: str) -> bool:
  """Whether a parameter name is a unit's weights (r, or the w of p+/p-): decayed like a
  kernel. Gains and the linear unit's offsets are not, like biases."""
  kind = _kind_of(name)
  return kind is not None and name == param_name(kind, UNIT_KINDS[kind][0])


class UnitPack(NamedTuple):
  """The units of one kind on one layer: arrays or jax.ShapeDtypeStructs."""
  kind: str
  index: Any                # [C] int32, the neuron of each slot
  depths: tuple             # per depth, [L_d] int32: the slots of its units (C: none)
  held: Any                 # None, or [D] int32: the units of each depth (a pack with room)
  params: dict[str, Any]    # {field: array} as unit_shapes(kind, C, d_in)

  @property
  def live(self):
    """[C] bool: the slots that hold a unit."""
    slots = jnp.concatenate([jnp.zeros(0, jnp.int32), *self.depths])
    return jnp.zeros(np.shape(self.index), jnp.bool_).at[slots].set(True, mode="drop")

  def held_per_depth(self) -> list[int]:
    """The units each depth holds, on the host: its list's length, or in a pack with room its
    held count (the list's first entries)."""
    if self.held is None:
      return [int(np.shape(slots)[0]) for slots in self.depths]
    return np.asarray(self.held).tolist()

  def unit_lists(self) -> list[np.ndarray]:
    """Each depth's slots that hold units, on the host: its list, or in a pack with room the
    list's first held_per_depth entries (the rest is padding)."""
    return [np.asarray(slots)[:n] for slots, n in zip(self.depths, self.held_per_depth())]

  def units_per_depth(self) -> list[int]:
    """The units at each depth, down to the deepest that holds any."""
    held = self.held_per_depth()
    if self.held is None:
      return held
    return held[:max((d + 1 for d, n in enumerate(held) if n), default=0)]


class NewUnits(NamedTuple):
  """Units to add to one layer: `kind`, distinct neurons `index` [n] and their parameters
  {field: [n, ...]} as unit_shapes(kind, n, d_in)."""
  kind: str
  index: Any
  params: dict[str, Any]


def depth_name(kind: str, depth: int) -> str:
  """"gated_depth_1": the growth variable listing the slots of `kind`'s units at `depth`."""
  return param_name(kind, f"{DEPTH}_{depth}")


def layer_packs(params: Mapping[str, Any], growth: Mapping[str, Any]) -> dict[str, UnitPack]:
  """{kind: UnitPack} of one layer, from its params and growth collection (keyed by name)."""
  packs = {}
  for kind, fields in UNIT_KINDS.items():
    if param_name(kind, INDEX) in growth:
      depths = []
      while depth_name(kind, len(depths)) in growth:
        depths.append(growth[depth_name(kind, len(depths))])
      packs[kind] = UnitPack(kind, growth[param_name(kind, INDEX)], tuple(depths),
                             growth.get(param_name(kind, HELD)),
                             {f: params[param_name(kind, f)] for f in fields})
  return packs


def checked_variables(variables, caller: str):
  """`variables` if it is a model's variables ({"params": ..., "growth": ...}, as model.init
  returns them); a params tree (variables["params"]) is refused, naming `caller` and the fix."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError(f"{caller} takes the model's variables {{'params': ..., "
                    f"'{GROWTH_COLLECTION}': ...}} as model.init returns them, not "
                    "variables['params']: pass the whole variables")
  return variables


def unplaced_unit_fields(params: Mapping[str, Any], growth: Mapping[str, Any]) -> list[str]:
  """The unit fields among one layer's params (keyed by name) whose kind has no slot index in
  its growth collection: units that a model applied without that collection would drop."""
  return sorted(name for name in params
                if (kind := _kind_of(name)) is not None and param_name(kind, INDEX) not in growth)


def _split(variables) -> tuple[dict, dict]:
  return (traverse_util.flatten_dict(variables["params"], sep="/"),
          traverse_util.flatten_dict(variables.get(GROWTH_COLLECTION, {}), sep="/"))


def _sub(flat: Mapping[str, Any], path: str) -> dict[str, Any]:
  """The entries of the layer at `path` ("" for variables of one layer), keyed by name."""
  prefix = path + "/" if path else ""
  return {k[len(prefix):]: v for k, v in flat.items()
          if k.startswith(prefix) and "/" not in k[len(prefix):]}


def grown_layers(variables) -> dict[str, dict[str, UnitPack]]:
  """{layer path: {kind: UnitPack}} of every layer that carries unit slots."""
  params, growth = _split(variables)
  paths = sorted({k.rsplit("/", 1)[0] for k in growth if k.endswith("_" + INDEX)})
  return {path: layer_packs(_sub(params, path), _sub(growth, path)) for path in paths}


def set_packs(variables, packs: Mapping[str, Mapping[str, UnitPack]]):
  """New variables with each named layer's packs {path: {kind: UnitPack}} set (added or
  replaced). Works on arrays and on jax.ShapeDtypeStructs alike."""
  params, growth = _split(variables)
  for path, by_kind in packs.items():
    for kind, pack in by_kind.items():
      for field, value in pack.params.items():
        params[f"{path}/{param_name(kind, field)}"] = value
      growth[f"{path}/{param_name(kind, INDEX)}"] = pack.index
      for depth, slots in enumerate(pack.depths):
        growth[f"{path}/{depth_name(kind, depth)}"] = slots
      if pack.held is not None:
        growth[f"{path}/{param_name(kind, HELD)}"] = pack.held
  new = dict(variables)
  new["params"] = traverse_util.unflatten_dict(params, sep="/")
  if growth:
    new[GROWTH_COLLECTION] = traverse_util.unflatten_dict(growth, sep="/")
  return new


def abstract_pack(kind: str, lengths: list[int], slots: int, d_in: int, dtype, room: bool
                  ) -> UnitPack:
  """ShapeDtypeStructs of a pack of `slots` slots whose depths list `lengths` slots each, with
  held counts if it has `room` (rebuilding the abstract grown model before a restore)."""
  return UnitPack(kind, jax.ShapeDtypeStruct((slots,), jnp.int32),
                  tuple(jax.ShapeDtypeStruct((n,), jnp.int32) for n in lengths),
                  jax.ShapeDtypeStruct((len(lengths),), jnp.int32) if room else None,
                  {f: jax.ShapeDtypeStruct(s, dtype)
                   for f, s in unit_shapes(kind, slots, d_in).items()})


def empty_pack(kind: str, slots: int, d_in: int, dtype, room: tuple[int, ...] = ()) -> UnitPack:
  """A pack of `slots` empty slots: room for units before any is added. With `room`, its
  depths list that many slots each, all empty, and it counts the units each holds. Numpy
  arrays (on_device puts them on a device)."""
  return UnitPack(kind, np.zeros(slots, np.int32),
                  tuple(np.full(n, slots, np.int32) for n in room),
                  np.zeros(len(room), np.int32) if room else None,
                  {f: np.zeros(s, dtype) for f, s in unit_shapes(kind, slots, d_in).items()})


def on_device(pack: UnitPack) -> UnitPack:
  """`pack` with its arrays on the default device: one transfer each, no computation (host work
  on packs is numpy, so that a growth event compiles nothing; jnp.asarray would compile a
  conversion per shape)."""
  return pack._replace(index=jax.device_put(pack.index), depths=jax.device_put(pack.depths),
                       held=jax.device_put(pack.held), params=jax.device_put(pack.params))


def _host_live(index, depths) -> np.ndarray:
  """[C] bool on the host: the slots that the depth lists name (UnitPack.live in numpy)."""
  live = np.zeros(np.shape(index)[0], bool)
  slots = np.concatenate([np.zeros(0, np.int32), *map(np.asarray, depths)])
  live[slots[slots < len(live)]] = True
  return live


def _new_depths(pack: UnitPack, depth: np.ndarray, first: int, slots: int):
  """(depth lists, held counts) of `pack` with the new units' slots first, first + 1, ... at
  `depth` each, the lists' empty entries renumbered `slots` (the new capacity). A pack with
  room writes into its lists' empty entries, lengthening a list only where they are too few;
  one without gets lists exactly as long as their units. Numpy, on the host."""
  old, kept_lists = [np.asarray(d) for d in pack.depths], pack.unit_lists()
  count = max(len(old), int(depth.max(initial=-1)) + 1)
  lists, counts = [], []
  for d in range(count):
    kept = kept_lists[d] if d < len(old) else np.zeros(0, np.int32)
    added = first + np.flatnonzero(depth == d).astype(np.int32)
    units = np.concatenate([kept, added])
    length = max(len(old[d]) if d < len(old) and pack.held is not None else 0, len(units))
    lists.append(np.concatenate([units, np.full(length - len(units), slots, np.int32)]))
    counts.append(len(units))
  return tuple(lists), None if pack.held is None else np.asarray(counts, np.int32)


def _appended(pack: UnitPack | None, new: NewUnits, d_in: int, dtype, reserve_events: int
              ) -> UnitPack:
  """`pack` (None: empty) with the new units in its first free slots. A gated unit's depth is
  the number of gated units already on its neuron; linear units all sit at depth 0. A pack too
  small grows to room for `reserve_events` more events like this one as well (as many units
  each), its slots rounded up by `capacity`. Numpy, on the host: nothing compiles."""
  if pack is None:
    pack = empty_pack(new.kind, 0, d_in, dtype)
  index = np.asarray(pack.index)
  live = _host_live(index, pack.depths)
  used, n = int(live.sum()), len(new.index)
  fits = 0 < len(index) and used + n <= len(index)
  slots = len(index) if fits else capacity(used + n * (1 + reserve_events))
  new_index = np.asarray(new.index, np.int32)
  if new.kind == "gated":
    depth = np.array([np.sum(live & (index == j)) for j in new_index], np.int64)
  else:
    depth = np.zeros(n, np.int64)
  depths, held = _new_depths(pack, depth, used, slots)
  index = _pad(index, 0, slots)
  index[used:used + n] = new_index
  params = {}
  for field, value in pack.params.items():
    params[field] = _pad(np.asarray(sharding.host_value(value), dtype), 0, slots)
    params[field][used:used + n] = np.asarray(new.params[field], dtype)
  return UnitPack(new.kind, index, depths, held, params)


def _pad(array, axis: int, size: int):
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, size - array.shape[axis])
  return np.pad(array, widths)


def add_unit_packs(variables, units: Mapping[str, NewUnits], reserve_events: int = 0):
  """New variables with the units {path: NewUnits} added to each named layer (pure).

  `path` is the layer's module path, "blocks_0/attn/qkv". Slots already used keep their place
  (and so their optimizer state); parameters are cast to the layer kernel's dtype. A pack that
  must grow also makes room for `reserve_events` more events adding as many units (a training
  schedule's events still to come): slots that cost their parameters' memory, not compute.
  """
  params, _ = _split(variables)
  current = grown_layers(variables)
  packs = {}
  for path, new in units.items():
    kernel = params[f"{path}/kernel"]
    old = current.get(path, {}).get(new.kind)
    packs[path] = {new.kind: on_device(_appended(old, new, kernel.shape[0], kernel.dtype,
                                                  reserve_events))}
  return set_packs(variables, packs)


class LiveUnits(NamedTuple):
  """The units of one kind on one layer, in slot order (numpy)."""
  slots: np.ndarray            # [n] the slots that hold them
  neurons: np.ndarray          # [n] the neuron each sits on
  depths: np.ndarray           # [n] each one's depth: 0 reads the layer's output, d the
                               # output after the units at depths < d of its neuron
  params: dict[str, np.ndarray]  # {field: [n, ...]}, as UNIT_KINDS names them


def live_units(variables, path: str) -> dict[str, LiveUnits]:
  """{kind: LiveUnits} of the layer at `path` ("blocks_0/mlp/fc1"): its units' neurons,
  depths and parameters, without the empty slots; {} for a layer that never grew."""
  checked_variables(variables, "live_units")
  packs = grown_layers({"params": variables["params"],
                        GROWTH_COLLECTION: sharding.host_value(variables.get(GROWTH_COLLECTION, {}))})
  out = {}
  for kind, pack in packs.get(path, {}).items():
    lists = pack.unit_lists()
    slots = np.concatenate([np.zeros(0, np.int32)] + lists)
    depths = np.concatenate([np.zeros(0, np.int32)] +
                            [np.full(len(l), d, np.int32) for d, l in enumerate(lists)])
    order = np.argsort(slots, kind="stable")
    slots, depths = slots[order], depths[order]
    out[kind] = LiveUnits(slots, np.asarray(pack.index)[slots], depths,
                          {f: np.asarray(sharding.host_value(v))[slots]
                           for f, v in pack.params.items()})
  return out


def whole_lists(variables):
  """The variables without held counts: each pack with room then computes its whole padded
  lists, whose entries that hold no unit compute exact zeros. The same function in a program
  whose shapes no event changes (the room is the schedule's), and without the run-time choice
  of prefixes: one that runs once per event, such as the spectrum, compiles once per run so."""
  params, growth = _split(checked_variables(variables, "whole_lists"))
  held = {param_name(kind, HELD) for kind in UNIT_KINDS}
  growth = {k: v for k, v in growth.items() if k.rsplit("/", 1)[-1] not in held}
  return {**variables, GROWTH_COLLECTION: traverse_util.unflatten_dict(growth, sep="/")}


def switch_off_units(variables):
  """The variables with every unit parameter zeroed: each unit's contribution is then exactly
  0 (a = 0; p+ = p- = 0), so the model computes its ungrown function."""
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  off = {k: jnp.zeros_like(v) if is_unit_param(k.rsplit("/", 1)[-1]) else v
         for k, v in params.items()}
  return {**variables, "params": traverse_util.unflatten_dict(off, sep="/")}


def live_slots(variables):
  """A tree like variables["params"]: for each unit field the [C] bool of its slots that hold a
  unit, True for every other parameter (optim.adamw counts steps only where True)."""
  params, growth = _split(variables)

  def live(path, _):
    *layer, name = [k.key for k in path]
    kind = _kind_of(name)
    if kind is None:
      return jnp.bool_(True)
    layer = "/".join(layer)
    return layer_packs(_sub(params, layer), _sub(growth, layer))[kind].live
  return jax.tree_util.tree_map_with_path(live, variables["params"])


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown unit activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def with_bias_input(x: jax.Array) -> jax.Array:
  """x~ = [x, 1]: the layer input extended so that r.x~ includes an offset."""
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def skip_unit(z: jax.Array, p: jax.Array, activation: str = "gelu") -> jax.Array:
  """u = 1/2 s(z + p) + 1/2 s(z - p) - s(z): even in p, second order at p = 0.

  Its derivative is written out (_skip_unit_jvp): each point's value and slope from one pass
  of s, combined into one slope in z and one in p; the rule is itself differentiable, as the
  spectrum's second derivatives need."""
  s = activation_fn(activation)
  return _combined(s(z + p), s(z - p), s(z))


def _combined(at_plus, at_minus, at_z):
  """1/2 f(z + p) + 1/2 f(z - p) - f(z) from f's values at the three points: the unit for
  f = s, its slope in z for f = s'."""
  return 0.5 * at_plus + 0.5 * at_minus - at_z


@skip_unit.defjvp
def _skip_unit_jvp(activation: str, primals, tangents):
  """du = (1/2 s'(z+p) + 1/2 s'(z-p) - s'(z)) dz + 1/2 (s'(z+p) - s'(z-p)) dp."""
  (z, p), (dz, dp) = primals, tangents
  s = activation_fn(activation)
  value_and_slope = lambda v: jax.jvp(s, (v,), (jnp.ones_like(v),))
  (s_plus, ds_plus), (s_minus, ds_minus), (s_z, ds_z) = map(value_and_slope, (z + p, z - p, z))
  unit = _combined(s_plus, s_minus, s_z)
  return unit, _combined(ds_plus, ds_minus, ds_z) * dz + 0.5 * (ds_plus - ds_minus) * dp


# Reverse mode keeps only the unit's inputs and recomputes its activations and slopes: XLA:CPU
# fuses the slopes' last step into the backward pass anyway, so that it would keep their pieces,
# three per point; at the paper's end state recomputing costs less time and memory (BENCHMARKS.md).
_recomputed_skip_unit = jax.checkpoint(skip_unit, static_argnums=(2,))


def probe_branch(z: jax.Array, p: jax.Array, activation: str = "gelu") -> jax.Array:
  """s(zs + p) - s(zs) - s'(zs) p with zs = stop_gradient(z).

  Its value and its first derivative in p vanish at p = 0, so attaching it to every neuron
  adds nothing to the loss or to the Gauss-Newton part of the Hessian; its Hessian in p is
  g s''(z) per token, which is what the splitting matrix needs (docs/method.md, "The probe
  branch").
  """
  s = activation_fn(activation)
  zs = lax.stop_gradient(z)
  s_zs, ds_p = jax.jvp(s, (zs,), (p,))
  return s(zs + p) - s_zs - ds_p


def linear_unit(p: jax.Array, activation: str = "gelu") -> jax.Array:
  """s(p) - s(0) + p with p = q.x~: zero at q = 0, slope 1 + s'(0) there."""
  s = activation_fn(activation)
  return s(p) - s(jnp.zeros((), p.dtype)) + p


# How a depth's units read and add to their neurons' rows of the layer output [d_out, tokens]:
# "gather" (a gather and a scatter-add of whole rows) or "onehot" (two matmuls with the [n,
# d_out] one-hot of the neurons, as JAX MoE layers route tokens). A backend picks one here; the
# others get DEFAULT_DISPATCH. The two compute the same sums (tests); which is faster depends
# on the backend (BENCHMARKS.md).
DISPATCH_BY_BACKEND: dict[str, str] = {}
DEFAULT_DISPATCH = "gather"


def dispatch(name: str):
  """(take, add) of a dispatch: take(yt, neurons) -> [n, tokens], the neurons' rows;
  add(yt, neurons, rows) -> yt with the rows added to theirs. A neuron >= d_out (a listed
  slot that holds no unit) reads zeros and adds nothing."""
  if name == "gather":
    return (lambda yt, neurons: yt.at[neurons].get(mode="fill", fill_value=0),
            lambda yt, neurons, rows: yt.at[neurons].add(rows, mode="drop"))
  if name == "onehot":
    hot = lambda yt, neurons: jax.nn.one_hot(neurons, yt.shape[0], dtype=yt.dtype)
    return (lambda yt, neurons: hot(yt, neurons) @ yt,
            lambda yt, neurons, rows: yt + hot(yt, neurons).T @ rows)
  raise ValueError(f"unknown unit dispatch {name!r}; choose 'gather' or 'onehot'")


def backend_dispatch() -> str:
  """The dispatch of the backend JAX computes on (DISPATCH_BY_BACKEND)."""
  return DISPATCH_BY_BACKEND.get(jax.default_backend(), DEFAULT_DISPATCH)


def _gather_slots(index, params: dict, slots, d_out: int, dtype):
  """(parameters {field: [n, ...]}, neurons [n]) of the listed slots; an entry >= C (no unit)
  gets zero parameters and neuron d_out, which reads zeros and adds nothing."""
  rows = {f: v.at[slots].get(mode="fill", fill_value=0).astype(dtype) for f, v in params.items()}
  return rows, index.at[slots].get(mode="fill", fill_value=d_out)


def _add_units(yt, xt, kind: str, rows: dict, neurons, activation: str, how: str,
               recompute: bool):
  """yt [d_out, tokens] plus one depth's units, parameters `rows` on `neurons` (distinct, or
  linear units, which do not read yt), projected from xt [d_in, tokens]; with `recompute`, the
  gated units' activations and slopes are recomputed in the backward pass."""
  take, add = dispatch(how)
  if kind == "gated":
    weights, offsets = rows["r"][:, :-1], rows["r"][:, -1]
  else:
    weights, offsets = rows["w"][:, 0] + rows["w"][:, 1], rows["b"][:, 0] + rows["b"][:, 1]
  p = weights @ xt + offsets[:, None]
  if kind == "linear":
    return add(yt, neurons, linear_unit(p, activation))
  unit = _recomputed_skip_unit if recompute else skip_unit
  return add(yt, neurons, rows["a"][:, None] * unit(take(yt, neurons), p, activation))


def bucket_sizes(length: int) -> list[int]:
  """The prefixes of a depth list with room that a step may choose from: 0, the whole list, and
  quarters of the one above down to MIN_CAPACITY. Each is a branch that compiles, forward and
  backward, and on CPU compile time grows with their number (fewer cost step time where few
  units are held: BENCHMARKS.md), so a depth with units computes at most four times as many
  slots as it holds, or MIN_CAPACITY."""
  sizes = [length] if length else []
  while sizes and sizes[-1] // 4 >= MIN_CAPACITY:
    sizes.append(sizes[-1] // 4)
  return [0] + sizes[::-1]


def _add_depth(yt, xt, kind, index, params, slots, held, activation, how):
  """yt plus the units of one depth, whose list is `slots`. Without held counts the list is
  exactly its units, and all compute; with them (a pack with room), the shortest prefix of
  bucket_sizes that holds the `held` units, chosen at run time and rematerialised in the
  backward pass, so that the prefixes not taken keep no residuals. A prefix gathers its own
  slots' parameters: a depth that holds nothing moves nothing."""
  def prefix(size):
    def run(yt, xt, index, params, slots):
      rows, neurons = _gather_slots(index, params, slots[:size], yt.shape[0], yt.dtype)
      # A prefix with room is rematerialised whole: its units need no recomputing of their own.
      return _add_units(yt, xt, kind, rows, neurons, activation, how, recompute=held is None)
    return run
  if held is None:
    return prefix(slots.shape[0])(yt, xt, index, params, slots)
  sizes = bucket_sizes(slots.shape[0])
  which = jnp.sum(jnp.asarray(sizes, jnp.int32) < held)  # the first size that holds them
  return lax.switch(which, [(lambda yt, *_: yt) if size == 0 else jax.checkpoint(prefix(size))
                            for size in sizes], yt, xt, index, params, slots)


def apply_unit_packs(y, x, packs: Mapping[str, UnitPack], activation: str = "gelu"):
  """Applies the packs to y [..., d_out] (linear units, then gated ones by depth); x [..., d_in]
  is the layer's input. A depth computes only the slots its list names: as many as its units,
  or in a pack with room (held counts) the shortest of bucket_sizes' prefixes that holds
  them. Never a loop over neurons.

  The work runs neuron-major, [d_out, tokens]: each gather and scatter then moves whole rows
  of tokens, where along the last axis every element is its own scatter index (on CPU those
  cost more than the units' arithmetic; BENCHMARKS.md)."""
  arrays = {kind: (pack.index, pack.depths, pack.held, pack.params) for kind, pack in packs.items()}
  return _apply_unit_packs(y, x, arrays, activation, backend_dispatch())


# A jit of its own, so that layers of equal shapes trace and differentiate their units once
# per program instead of once per layer (BENCHMARKS.md). XLA inlines it: the compiled program
# is the same.
@functools.partial(jax.jit, static_argnames=("activation", "how"))
def _apply_unit_packs(y, x, arrays: dict[str, tuple], activation: str, how: str):
  lead, d_out = y.shape[:-1], y.shape[-1]
  yt = y.reshape(-1, d_out).T
  xt = x.reshape(-1, x.shape[-1]).T
  for kind in UNIT_KINDS:
    if kind in arrays:
      index, depths, held, params = arrays[kind]
      for depth, slots in enumerate(depths):
        yt = _add_depth(yt, xt, kind, index, params, slots, None if held is None else held[depth],
                        activation, how)
  return yt.T.reshape(lead + (d_out,))


class GrowableDense(nn.Module):
  """nn.Dense plus the skip-connected units found in its variables.

  With no units it computes exactly what nn.Dense computes on the same params.
  """

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  unit_activation: str = "gelu"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(
        inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    params, growth = self.variables.get("params", {}), self.variables.get(GROWTH_COLLECTION, {})
    if lost := unplaced_unit_fields(params, growth):
      raise ValueError(
          f"GrowableDense {'/'.join(self.path)!r} has unit parameters {lost} but not the "
          f"{GROWTH_COLLECTION!r} collection that places them: apply all the variables, "
          f"model.apply(variables, x) or model.apply({{'params': params, '{GROWTH_COLLECTION}': "
          f"growth}}, x) (flax's TrainState drops it; hetscale_jax.train_state.TrainState "
          "carries it along)")
    packs = layer_packs(params, growth)
    if not packs:
      return y
    out = apply_unit_packs(y, inputs, packs, self.unit_activation)
    if self.is_mutable_collection(CONTRIBUTION[0]):
      tokens = tuple(range(out.ndim - 1))
      self.sow(*CONTRIBUTION, jnp.mean(jnp.abs(out - y).astype(jnp.float32), axis=tokens))
    return out
