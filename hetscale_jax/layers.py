"""GrowableDense: a linear layer that carries skip-connected units (docs/method.md, "The unit").

Two kinds of unit, on neuron j with output z_j (earlier units included) and x~ = [x, 1]:

    gated:   y_j = z_j + a * (1/2 s(z_j + r.x~) + 1/2 s(z_j - r.x~) - s(z_j))
    linear:  y_j = z_j + s(q.x~) - s(0) + q.x~,   q = p+ + p-

The gated unit is the paper's text: exact at a = 0, where dL/da is second order in r. The
linear unit is the authors' released one: exact at p+ = -p-, and its gradient at insertion is
first order, (1 + s'(0)) dL/dy_j x~. The layer reads its units from the variables it is given,
so a model built from GrowableDense never changes its code when it grows:

    gated   params/<layer>/units{k}_r   [n_k, d_in + 1]   direction of each unit of stage k
            params/<layer>/units{k}_a   [n_k]             output gain of each unit
    linear  params/<layer>/units{k}_w   [2, n_k, d_in]    p+ and p-, weights
            params/<layer>/units{k}_b   [2, n_k]          p+ and p-, offsets
    both    growth/<layer>/units{k}_index  [n_k] int32    neuron each unit sits on

Stage k holds the units added by one growth event (a neuron appears at most once per stage),
all of one kind; stages are applied in order, so a neuron grown twice gets its second unit on
top of the output of its first. This module owns the unit variables' names, shapes and
parameter counts and their stage layout (`num_stages`, `add_unit_stages`); it knows nothing
about how units are chosen.
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
# The parameter fields of each unit kind, in the order unit_param_names gives them; the first
# is decayed like a kernel.
UNIT_KINDS = {"gated": ("r", "a"), "linear": ("w", "b")}
_PARAM, _INDEX = "units{}_{}", "units{}_index"


def _check_kind(kind: str):
  if kind not in UNIT_KINDS:
    raise ValueError(f"unknown unit kind {kind!r}; choose one of {sorted(UNIT_KINDS)}")


def unit_param_names(stage: int, kind: str = "gated") -> tuple[str, ...]:
  """Names of stage `stage`'s unit parameters (in params) and index (in growth): ("units0_r",
  "units0_a", "units0_index") for gated units, ("units0_w", "units0_b", "units0_index") for
  linear ones."""
  _check_kind(kind)
  return tuple(_PARAM.format(stage, f) for f in UNIT_KINDS[kind]) + (_INDEX.format(stage),)


def unit_shapes(kind: str, num_units: int, d_in: int) -> dict[str, tuple[int, ...]]:
  """{field: shape} of a stage of `num_units` units of `kind` on a layer with d_in inputs."""
  _check_kind(kind)
  if kind == "gated":
    return {"r": (num_units, d_in + 1), "a": (num_units,)}
  return {"w": (2, num_units, d_in), "b": (2, num_units)}


def unit_param_count(kind: str, d_in: int) -> int:
  """Parameters of one unit: d_in + 2 for gated (r and a), 2 (d_in + 1) for linear (p+, p-)."""
  return sum(math.prod(shape) for shape in unit_shapes(kind, 1, d_in).values())


def _stage_of(name: str) -> int | None:
  """k of a unit parameter name "units{k}_<field>", else None."""
  prefix = _PARAM.split("{}")[0]
  digits = name[len(prefix):].split("_", 1)[0]
  return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def is_unit_direction(name: str) -> bool:
  """Whether a parameter name is a unit's weights (r, or the w of p+/p-) of some stage: decayed
  like a kernel. Gains and the linear unit's offsets are not, like biases."""
  stage = _stage_of(name)
  return stage is not None and name in {unit_param_names(stage, k)[0] for k in UNIT_KINDS}


def stage_kind(params: Mapping[str, Any], stage: int, path: str | None = None) -> str | None:
  """The kind of stage `stage`'s units, None if the layer has no such stage: `params` keyed by
  the layer's parameter names, or, with `path`, a flattened tree keyed "path/name"."""
  key = (lambda name: name) if path is None else (lambda name: f"{path}/{name}")
  for kind in UNIT_KINDS:
    if key(unit_param_names(stage, kind)[0]) in params:
      return kind
  return None


def num_stages(params: Mapping[str, Any], path: str | None = None) -> int:
  """How many unit stages a layer holds (`params` as for stage_kind)."""
  k = 0
  while stage_kind(params, k, path) is not None:
    k += 1
  return k


class UnitStage(NamedTuple):
  """One stage of units on one layer: arrays or jax.ShapeDtypeStructs."""
  kind: str
  index: Any                # [n] int32, the neurons
  params: dict[str, Any]    # {field: array} as unit_shapes(kind, n, d_in)


def add_unit_stages(variables, stages: Mapping[str, UnitStage]):
  """New variables with one more stage on each layer of `stages` {path: UnitStage}.

  Works on arrays and on jax.ShapeDtypeStructs alike (growing, and rebuilding the abstract
  grown model before a restore). `path` is the layer's module path, "blocks_0/attn/qkv".
  """
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  growth = traverse_util.flatten_dict(variables.get(GROWTH_COLLECTION, {}), sep="/")
  for path, stage in stages.items():
    *param_names, index_name = unit_param_names(num_stages(params, path), stage.kind)
    for name, field in zip(param_names, UNIT_KINDS[stage.kind]):
      params[f"{path}/{name}"] = stage.params[field]
    growth[f"{path}/{index_name}"] = stage.index
  new = dict(variables)
  new["params"] = traverse_util.unflatten_dict(params, sep="/")
  if growth:
    new[GROWTH_COLLECTION] = traverse_util.unflatten_dict(growth, sep="/")
  return new


def switch_off_units(variables):
  """The variables with every unit parameter zeroed: each unit's contribution is then exactly
  0 (a = 0; p+ = p- = 0), so the model computes its ungrown function."""
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  off = {k: jnp.zeros_like(v) if _stage_of(k.rsplit("/", 1)[-1]) is not None else v
         for k, v in params.items()}
  return {**variables, "params": traverse_util.unflatten_dict(off, sep="/")}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown unit activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def with_bias_input(x: jax.Array) -> jax.Array:
  """x~ = [x, 1]: the layer input extended so that r.x~ includes an offset."""
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def skip_unit(z: jax.Array, p: jax.Array, activation: str = "gelu") -> jax.Array:
  """u = 1/2 s(z + p) + 1/2 s(z - p) - s(z): even in p, second order at p = 0."""
  s = activation_fn(activation)
  return 0.5 * s(z + p) + 0.5 * s(z - p) - s(z)


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


def _projections(stage: UnitStage) -> tuple[jax.Array, jax.Array]:
  """(weights [n, d_in], offsets [n]) of the stage's units: r.x~ for gated units, q.x~ with
  q = p+ + p- for linear ones."""
  if stage.kind == "gated":
    r = stage.params["r"]
    return r[:, :-1], r[:, -1]
  return stage.params["w"][0] + stage.params["w"][1], stage.params["b"][0] + stage.params["b"][1]


def apply_unit_stages(y, x, stages: list[UnitStage], activation: str = "gelu"):
  """Applies the stages to y [..., d_out], in order; x [..., d_in] is the layer's input.

  The projections of every stage come from one matmul on x (x~ = [x, 1] is never built: the
  offsets are added); then one gather and one scatter per stage, in order, since a gated stage
  reads the neuron outputs of the stages before it. Never a loop over neurons.
  """
  weights, offsets = zip(*map(_projections, stages))
  projections = jnp.einsum("...i,ni->...n", x, jnp.concatenate(weights)) + jnp.concatenate(offsets)
  splits = np.cumsum([len(stage.index) for stage in stages])[:-1]
  for stage, p in zip(stages, jnp.split(projections, splits, axis=-1)):
    if stage.kind == "gated":
      z = jnp.take(y, stage.index, axis=-1)
      unit = stage.params["a"] * skip_unit(z, p, activation)
    else:
      unit = linear_unit(p, activation)
    y = y.at[..., stage.index].add(unit)
  return y


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
    stages = self.unit_stages(y.dtype)
    if not stages:
      return y
    out = apply_unit_stages(y, inputs, stages, self.unit_activation)
    if self.is_mutable_collection(CONTRIBUTION[0]):
      tokens = tuple(range(out.ndim - 1))
      self.sow(*CONTRIBUTION, jnp.mean(jnp.abs(out - y).astype(jnp.float32), axis=tokens))
    return out

  def unit_stages(self, dtype) -> list[UnitStage]:
    """Every stage present in this layer's variables, in order, its parameters in `dtype`."""
    params = self.variables.get("params", {})
    stages = []
    for k in range(num_stages(params)):
      kind = stage_kind(params, k)
      *param_names, index_name = unit_param_names(k, kind)
      stages.append(UnitStage(
          kind, self.get_variable(GROWTH_COLLECTION, index_name),
          {field: jnp.asarray(params[name], dtype)
           for field, name in zip(UNIT_KINDS[kind], param_names)}))
    return stages
