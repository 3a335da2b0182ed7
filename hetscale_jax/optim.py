"""AdamW whose bias correction counts steps per parameter, so parameters born at a growth
event take their first steps like a fresh Adam (see grow.migrate_opt_state)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from hetscale_jax import layers


class ScaleByAdamPerParamState(NamedTuple):
  count: optax.Params  # int32 [] per parameter leaf: steps that parameter has taken
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_per_param(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                            ) -> optax.GradientTransformation:
  """optax.scale_by_adam, from optax's own tree helpers, with one step count per parameter leaf
  instead of one shared: each leaf's bias correction uses its own count."""

  def init_fn(params):
    return ScaleByAdamPerParamState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = jax.tree.map(optax.safe_int32_increment, state.count)

    def corrected(moments, decay):
      return jax.tree.map(lambda m, c: optax.tree.bias_correction(m, decay, c), moments, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), corrected(mu, b1), corrected(nu, b2))
    return updates, ScaleByAdamPerParamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params):
  """Weight decay on kernels and unit directions only: not on biases, norms, unit gains,
  position embedding or class token (the DeiT recipe)."""
  def decays(path, _):
    name = path[-1].key
    return name == "kernel" or layers.is_unit_direction(name)
  return jax.tree_util.tree_map_with_path(decays, params)


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.05) -> optax.GradientTransformation:
  return optax.chain(
      scale_by_adam_per_param(b1, b2, eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate))
