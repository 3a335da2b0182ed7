"""GrowableDense: a linear layer that carries skip-connected units (docs/method.md, "The unit").

Two kinds of unit, on neuron j with output z_j (earlier units included) and x~ = [x, 1]:

    gated:   y_j = z_j + a * (1/2 s(z_j + r.x~) + 1/2 s(z_j - r.x~) - s(z_j))
    linear:  y_j = z_j + s(q.x~) - s(0) + q.x~,   q = p+ + p-

The gated unit is the paper's text: exact at a = 0, where dL/da is second order in r. The
linear unit is the authors' released one: exact at p+ = -p-, and its gradient at insertion is
first order, (1 + s'(0)) dL/dy_j x~. The layer reads its units from the variables it is given,
so a model built from GrowableDense never changes its code when it grows.

Every unit of one kind on one layer lives in one packed set of arrays, whatever the growth
event that added it, so that the compiled programs do not grow with the number of events:

    gated   params/<layer>/gated_r        [C, d_in + 1]  direction of each unit slot
            params/<layer>/gated_a        [C]            output gain
    linear  params/<layer>/linear_w       [C, 2, d_in]   p+ and p-, weights
            params/<layer>/linear_b       [C, 2]         p+ and p-, offsets
    both    growth/<layer>/<kind>_index     [C] int32      neuron each slot sits on
            growth/<layer>/<kind>_at_depth  [D, C] bool    slot c holds a unit at depth d

A gated unit at depth d reads its neuron's output after the units at depths < d: a neuron grown
twice gets its second unit on top of its first. The units of one depth sit on distinct neurons,
so each depth is one gather and one scatter, and a scan over the depth axis applies them in
order: the code is the same for any D. A depth that holds no unit (one reserved for events to
come) is skipped at run time, in the backward pass too: with several depths, each depth's
work is rematerialised (jax.checkpoint) instead of stored, so a skipped one has no residuals
to fill. Linear units do not read z_j, so they all apply at once (D = 1), before the gated
ones. Capacities C are padded to a ladder of sizes (`capacity`: powers of two and the points
halfway between), so that events and runs that grow by different amounts often share shapes,
and a compiled program or the persistent XLA cache serves them.
A padded slot (a column of at_depth with no True) is exactly inert: its parameters are zero,
its contribution and gradient are masked to zero, it is not counted as a parameter, and
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

# Unit nonlinearities s. Exact-erf GELU matches the DeiT MLP and is the default.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
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
INDEX, AT_DEPTH = "index", "at_depth"
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
  at_depth: Any             # [D, C] bool
  params: dict[str, Any]    # {field: array} as unit_shapes(kind, C, d_in)

  @property
  def live(self):
    """[C] bool: the slots that hold a unit."""
    return jnp.any(self.at_depth, axis=0)


class NewUnits(NamedTuple):
  """Units to add to one layer: `kind`, distinct neurons `index` [n] and their parameters
  {field: [n, ...]} as unit_shapes(kind, n, d_in)."""
  kind: str
  index: Any
  params: dict[str, Any]


def layer_packs(params: Mapping[str, Any], growth: Mapping[str, Any]) -> dict[str, UnitPack]:
  """{kind: UnitPack} of one layer, from its params and growth collection (keyed by name)."""
  packs = {}
  for kind, fields in UNIT_KINDS.items():
    if param_name(kind, INDEX) in growth:
      packs[kind] = UnitPack(kind, growth[param_name(kind, INDEX)],
                             growth[param_name(kind, AT_DEPTH)],
                             {f: params[param_name(kind, f)] for f in fields})
  return packs


def _split(variables) -> tuple[dict, dict]:
  return (traverse_util.flatten_dict(variables["params"], sep="/"),
          traverse_util.flatten_dict(variables.get(GROWTH_COLLECTION, {}), sep="/"))


def _sub(flat: Mapping[str, Any], path: str) -> dict[str, Any]:
  return {k[len(path) + 1:]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path}


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
      growth[f"{path}/{param_name(kind, AT_DEPTH)}"] = pack.at_depth
  new = dict(variables)
  new["params"] = traverse_util.unflatten_dict(params, sep="/")
  if growth:
    new[GROWTH_COLLECTION] = traverse_util.unflatten_dict(growth, sep="/")
  return new


def abstract_pack(kind: str, depths: int, slots: int, d_in: int, dtype) -> UnitPack:
  """ShapeDtypeStructs of a pack of `slots` slots and `depths` depths (rebuilding the abstract
  grown model before a restore)."""
  return UnitPack(kind, jax.ShapeDtypeStruct((slots,), jnp.int32),
                  jax.ShapeDtypeStruct((depths, slots), jnp.bool_),
                  {f: jax.ShapeDtypeStruct(s, dtype)
                   for f, s in unit_shapes(kind, slots, d_in).items()})


def empty_pack(kind: str, depths: int, slots: int, d_in: int, dtype) -> UnitPack:
  """A pack of `slots` empty slots and `depths` depths: room for units before any is added."""
  return UnitPack(kind, jnp.zeros(slots, jnp.int32), jnp.zeros((depths, slots), jnp.bool_),
                  {f: jnp.zeros(s, dtype) for f, s in unit_shapes(kind, slots, d_in).items()})


def _pad(array, axis: int, size: int):
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, size - array.shape[axis])
  return np.pad(array, widths)


def _appended(pack: UnitPack | None, new: NewUnits, d_in: int, dtype, reserve_events: int
              ) -> UnitPack:
  """`pack` (None: empty) with the new units in its first free slots. A gated unit's depth is
  the number of gated units already on its neuron; linear units all sit at depth 0. A pack too
  small grows to room for `reserve_events` more events like this one as well (as many units
  each, and for gated units one depth more each), its slots rounded up by `capacity`."""
  if pack is None:
    pack = empty_pack(new.kind, 0, 0, d_in, dtype)
  index, at_depth = np.asarray(pack.index), np.asarray(pack.at_depth)
  live = at_depth.any(axis=0)
  used, n = int(live.sum()), len(new.index)
  fits = 0 < len(index) and used + n <= len(index)
  slots = len(index) if fits else capacity(used + n * (1 + reserve_events))
  new_index = np.asarray(new.index, np.int32)
  if new.kind == "gated":
    depth = np.array([np.sum(live & (index == j)) for j in new_index], np.int64)
  else:
    depth = np.zeros(n, np.int64)
  needed = int(depth.max(initial=0)) + 1
  depths = (at_depth.shape[0] if needed <= at_depth.shape[0]
            else needed + (reserve_events if new.kind == "gated" else 0))
  index = _pad(index, 0, slots)
  index[used:used + n] = new_index
  at_depth = _pad(_pad(at_depth, 1, slots), 0, depths)
  at_depth[depth, np.arange(used, used + n)] = True
  params = {}
  for field, value in pack.params.items():
    padded = jnp.pad(jnp.asarray(value, dtype), [(0, slots - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
    params[field] = padded.at[used:used + n].set(jnp.asarray(new.params[field], dtype))
  return UnitPack(new.kind, jnp.asarray(index), jnp.asarray(at_depth), params)


def add_unit_packs(variables, units: Mapping[str, NewUnits], reserve_events: int = 0):
  """New variables with the units {path: NewUnits} added to each named layer (pure).

  `path` is the layer's module path, "blocks_0/attn/qkv". Slots already used keep their place
  (and so their optimizer state); parameters are cast to the layer kernel's dtype. A pack that
  must grow also makes room for `reserve_events` more events adding as many units (a training
  schedule's events still to come), so that they usually fit the same shapes: no recompile.
  """
  params, _ = _split(variables)
  current = grown_layers(variables)
  packs = {}
  for path, new in units.items():
    kernel = params[f"{path}/kernel"]
    old = current.get(path, {}).get(new.kind)
    packs[path] = {new.kind: _appended(old, new, kernel.shape[0], kernel.dtype, reserve_events)}
  return set_packs(variables, packs)


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
  growth = traverse_util.flatten_dict(variables.get(GROWTH_COLLECTION, {}), sep="/")

  def live(path, _):
    *layer, name = [k.key for k in path]
    kind = _kind_of(name)
    if kind is None:
      return jnp.bool_(True)
    return jnp.any(growth["/".join(layer + [param_name(kind, AT_DEPTH)])], axis=0)
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

  Its derivative is written out (_skip_unit_jvp) so that reverse mode keeps two arrays per
  slot and token, the two slopes, instead of what differentiating three activations keeps; the
  rule is itself differentiable, as the spectrum's second derivatives need."""
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


def _projections(pack: UnitPack, dtype) -> tuple[jax.Array, jax.Array]:
  """(weights [C, d_in], offsets [C]) of the pack's slots: r.x~ for gated units, q.x~ with
  q = p+ + p- for linear ones."""
  if pack.kind == "gated":
    r = pack.params["r"].astype(dtype)
    return r[:, :-1], r[:, -1]
  w, b = pack.params["w"].astype(dtype), pack.params["b"].astype(dtype)
  return w[:, 0] + w[:, 1], b[:, 0] + b[:, 1]


def _apply_pack(yt, xt, pack: UnitPack, activation: str):
  """yt [d_out, tokens] with the units of `pack` added: linear ones at once, gated ones depth
  by depth (a scan that skips depths without units). Masked slots compute and add exactly 0.

  lax.cond alone would not skip a depth's backward: its residuals, zeros where the depth was
  skipped, would be filled and kept for every depth. With several depths each is therefore
  rematerialised (jax.checkpoint), which leaves none; a single depth keeps its two slopes, which
  costs less than recomputing the activations (BENCHMARKS.md)."""
  weights, offsets = _projections(pack, yt.dtype)
  p = weights @ xt + offsets[:, None]
  if pack.kind == "linear":
    return yt.at[pack.index].add(jnp.where(pack.live[:, None], linear_unit(p, activation), 0))
  gain = pack.params["a"].astype(yt.dtype)[:, None]

  def add(yt, at_depth):
    unit = gain * skip_unit(yt[pack.index], p, activation)
    return yt.at[pack.index].add(jnp.where(at_depth[:, None], unit, 0))

  if pack.at_depth.shape[0] > 1:
    add = jax.checkpoint(add)

  def add_depth(yt, at_depth):
    return lax.cond(jnp.any(at_depth), add, lambda yt, _: yt, yt, at_depth), None
  return lax.scan(add_depth, yt, pack.at_depth)[0]


def apply_unit_packs(y, x, packs: Mapping[str, UnitPack], activation: str = "gelu"):
  """Applies the packs to y [..., d_out] (linear units, then gated ones by depth); x [..., d_in]
  is the layer's input. One matmul on x per kind (x~ = [x, 1] is never built: the offsets are
  added); masked slots add exactly 0 and get no gradient. Never a loop over neurons.

  The work runs neuron-major, [d_out, tokens]: each gather and scatter then moves whole rows
  of tokens, where along the last axis every element is its own scatter index (on CPU those
  cost more than the units' arithmetic; BENCHMARKS.md)."""
  arrays = {kind: (pack.index, pack.at_depth, pack.params) for kind, pack in packs.items()}
  return _apply_unit_packs(y, x, arrays, activation)


# A jit of its own, so that layers of equal shapes trace and differentiate their units' scan,
# conds and remat once per program instead of once per layer, which was most of the train
# step's tracing (BENCHMARKS.md). XLA inlines it: the compiled program is the same.
@functools.partial(jax.jit, static_argnames="activation")
def _apply_unit_packs(y, x, arrays: dict[str, tuple], activation: str):
  lead, d_out = y.shape[:-1], y.shape[-1]
  yt = y.reshape(-1, d_out).T
  xt = x.reshape(-1, x.shape[-1]).T
  for kind in UNIT_KINDS:
    if kind in arrays:
      yt = _apply_pack(yt, xt, UnitPack(kind, *arrays[kind]), activation)
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
    packs = layer_packs(self.variables.get("params", {}),
                        self.variables.get(GROWTH_COLLECTION, {}))
    if not packs:
      return y
    out = apply_unit_packs(y, inputs, packs, self.unit_activation)
    if self.is_mutable_collection(CONTRIBUTION[0]):
      tokens = tuple(range(out.ndim - 1))
      self.sow(*CONTRIBUTION, jnp.mean(jnp.abs(out - y).astype(jnp.float32), axis=tokens))
    return out
