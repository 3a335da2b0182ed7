"""AdamW whose bias correction counts steps per parameter, so parameters born at a growth
event take their first steps like a fresh Adam (see grow.migrate_opt_state).

Unit fields hold many units in slots along their first axis (layers.py), born at different
events, so their step counts are kept per slot; `tx.update(..., live=layers.live_slots(v))`
counts a slot's steps only while it holds a unit, and a padded slot never steps.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from hetscale_jax import layers


class ScaleByAdamPerParamState(NamedTuple):
  count: optax.Params  # int32 per parameter leaf ([] ), or per slot ([C]) for unit fields
  mu: optax.Updates
  nu: optax.Updates


def _step_counts(params):
  def zeros(path, leaf):
    per_slot = layers.is_unit_param(path[-1].key)
    return jnp.zeros(jnp.shape(leaf)[:1] if per_slot else [], jnp.int32)
  return jax.tree_util.tree_map_with_path(zeros, params)


def _bias_correction(moment, decay: float, count):
  """optax's bias correction with a count per leaf or per slot (leading axis); a count of 0
  (a slot that never stepped, whose moments are 0) leaves the moment at 0."""
  count = jnp.reshape(jnp.maximum(count, 1), jnp.shape(count) + (1,) * (moment.ndim - jnp.ndim(count)))
  return optax.tree.bias_correction(moment, decay, count)


def _check_same_params(updates, moments):
  """Refuses an optimizer state made for other parameters than the updates': parameters that
  a growth event added, or unit fields it padded to more slots, with the state not migrated."""
  ours = {jax.tree_util.keystr(k): jnp.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(updates)}
  theirs = {jax.tree_util.keystr(k): jnp.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(moments)}
  if ours != theirs:
    field = next(k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k))
    raise ValueError(f"optim.adamw: the optimizer state does not match the parameters at {field} "
                     f"(state {theirs.get(field)}, parameters {ours.get(field)}): after growing, "
                     "migrate it with grow.migrate_opt_state(tx, opt_state, new_params)")


def scale_by_adam_per_param(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                            ) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_adam, from optax's own tree helpers, with one step count per parameter leaf
  (per slot for unit fields) instead of one shared. The optional `live` (a tree like the params
  of bools, layers.live_slots) says where a step is counted; without it every count steps."""

  def init_fn(params):
    return ScaleByAdamPerParamState(count=_step_counts(params), mu=optax.tree.zeros_like(params),
                                    nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, live=None, **extra_args):
    del params, extra_args
    _check_same_params(updates, state.mu)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    live = jax.tree.map(lambda _: True, state.count) if live is None else live
    count = jax.tree.map(lambda c, step: c + jnp.asarray(step, jnp.int32), state.count, live)

    def corrected(moments, decay):
      return jax.tree.map(lambda m, c: _bias_correction(m, decay, c), moments, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), corrected(mu, b1), corrected(nu, b2))
    return updates, ScaleByAdamPerParamState(count, mu, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
