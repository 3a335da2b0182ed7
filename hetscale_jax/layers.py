"""GrowableDense: a linear layer that carries skip-connected units (docs/method.md, "The unit").

A unit on neuron j replaces the neuron's output z_j by

    y_j = z_j + a * (1/2 s(z_j + r.x~) + 1/2 s(z_j - r.x~) - s(z_j)),   x~ = [x, 1].

The layer reads its units from the variables it is given, so a model built from
GrowableDense never changes its code when it grows:

    params/<layer>/units{k}_r      [n_k, d_in + 1]   direction of each unit of stage k
    params/<layer>/units{k}_a      [n_k]             output gain of each unit
    growth/<layer>/units{k}_index  [n_k] int32       neuron each unit sits on

Stage k holds the units added by one growth event (a neuron appears at most once per stage);
stages are applied in order, so a neuron grown twice gets its second unit on top of the
output of its first. This module owns the unit variables' names and their stage layout
(`num_stages`, `add_unit_stages`); it knows nothing about how units are chosen.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

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
_R, _A, _INDEX = "units{}_r", "units{}_a", "units{}_index"


def unit_param_names(stage: int) -> tuple[str, str, str]:
  """Names of stage `stage`'s direction and gain (in params) and index (in growth)."""
  return _R.format(stage), _A.format(stage), _INDEX.format(stage)


def is_unit_direction(name: str) -> bool:
  """Whether a parameter name is a unit direction r of some stage (decayed like a kernel)."""
  prefix, suffix = _R.split("{}")
  stage = name[len(prefix):-len(suffix)]
  return name.startswith(prefix) and name.endswith(suffix) and stage.isdigit()


def num_stages(params: Mapping[str, Any], path: str | None = None) -> int:
  """How many unit stages a layer holds: `params` keyed by the layer's parameter names, or,
  with `path`, a flattened tree keyed "path/name" ("blocks_0/attn/qkv/units0_r")."""
  key = (lambda name: name) if path is None else (lambda name: f"{path}/{name}")
  k = 0
  while key(unit_param_names(k)[0]) in params:
    k += 1
  return k


def add_unit_stages(variables, stages: Mapping[str, tuple[Any, Any, Any]]):
  """New variables with one more stage on each layer of `stages` {path: (r, a, index)}.

  Works on arrays and on jax.ShapeDtypeStructs alike (growing, and rebuilding the abstract
  grown model before a restore). `path` is the layer's module path, "blocks_0/attn/qkv".
  """
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  growth = traverse_util.flatten_dict(variables.get(GROWTH_COLLECTION, {}), sep="/")
  for path, (r, a, index) in stages.items():
    r_name, a_name, index_name = unit_param_names(num_stages(params, path))
    params[f"{path}/{r_name}"], params[f"{path}/{a_name}"] = r, a
    growth[f"{path}/{index_name}"] = index
  new = dict(variables)
  new["params"] = traverse_util.unflatten_dict(params, sep="/")
  if growth:
    new[GROWTH_COLLECTION] = traverse_util.unflatten_dict(growth, sep="/")
  return new


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


def apply_unit_stages(y, x, stages, activation: str = "gelu"):
  """Applies stages [(index [n], r [n, d_in+1], a [n]), ...] to y [..., d_out] in order.

  The directions r . x~ of every stage come from one matmul on x (x~ = [x, 1] is never
  built: the last column of r is added as an offset); then one gather and one scatter per
  stage, in order, since a stage reads the neuron outputs of the stages before it. Never a
  loop over neurons.
  """
  r = jnp.concatenate([r for _, r, _ in stages]) if len(stages) > 1 else stages[0][1]
  directions = jnp.einsum("...i,ni->...n", x, r[:, :-1]) + r[:, -1]
  offsets = np.cumsum([len(index) for index, _, _ in stages])[:-1]
  for (index, _, a), p in zip(stages, jnp.split(directions, offsets, axis=-1)):
    z = jnp.take(y, index, axis=-1)
    y = y.at[..., index].add(a * skip_unit(z, p, activation))
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
    if stages:
      y = apply_unit_stages(y, inputs, stages, self.unit_activation)
    return y

  def unit_stages(self, dtype) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """The (index, r, a) of every stage present in this layer's variables, in order."""
    stages = []
    for k in range(num_stages(self.variables.get("params", {}))):
      r_name, a_name, index_name = unit_param_names(k)
      stages.append((
          self.get_variable(GROWTH_COLLECTION, index_name),
          jnp.asarray(self.get_variable("params", r_name), dtype),
          jnp.asarray(self.get_variable("params", a_name), dtype),
      ))
    return stages
