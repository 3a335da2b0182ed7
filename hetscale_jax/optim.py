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
  """optax.scale_by_adam with one step count per parameter leaf instead of one shared."""

  def init_fn(params):
    return ScaleByAdamPerParamState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    count = jax.tree.map(lambda c: optax.safe_int32_increment(c), state.count)

    def step(m, v, c):
      m_hat = m / (1 - b1 ** c.astype(m.dtype))
      v_hat = v / (1 - b2 ** c.astype(v.dtype))
      return m_hat / (jnp.sqrt(v_hat) + eps)
    return jax.tree.map(step, mu, nu, count), ScaleByAdamPerParamState(count, mu, nu)

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
