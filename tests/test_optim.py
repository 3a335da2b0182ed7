"""Per-parameter-count Adam equals optax's Adam when nothing is added; the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_deit
from hetscale_jax import grow, optim
from hetscale_jax.splitting import random_spectrum


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {"dense": {"kernel": jax.random.normal(keys[0], (5, 3)), "bias": jnp.zeros(3)},
          "scale": jax.random.normal(keys[1], (7,)), "scalar": jnp.float32(0.3)}


@pytest.mark.parametrize("jit", [False, True])
def test_scale_by_adam_per_param_equals_optax_without_growth(jit):
  """Same moments and updates as optax.scale_by_adam, to float32 rounding.

  The moments are equal bit for bit (both come from optax's tree helpers); the updates are
  not: optax's jitted bias correction lets XLA turn t / c into t * (1 / c) depending on the
  tree it is given (ours corrects leaf by leaf, optax the whole tree: 1 ulp). 1 ulp of float32
  is up to 1.2e-7 relative.
  """
  ours, stock = optim.scale_by_adam_per_param(), optax.scale_by_adam()
  update_ours, update_stock = ((jax.jit(ours.update), jax.jit(stock.update)) if jit
                               else (ours.update, stock.update))
  params = _params()
  state_ours, state_stock = ours.init(params), stock.init(params)
  worst_elementwise, worst_normwise = 0.0, 0.0
  for step in range(6):
    # Gradients over several orders of magnitude, so eps and the bias corrections matter.
    grads = jax.tree.map(lambda p, step=step: jax.random.normal(
        jax.random.fold_in(jax.random.key(10), step), jnp.shape(p)) * 10.0 ** (step - 4), params)
    u_ours, state_ours = update_ours(grads, state_ours)
    u_stock, state_stock = update_stock(grads, state_stock)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_stock)):
      assert a.dtype == b.dtype == jnp.float32
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      worst_elementwise = max(worst_elementwise, np.max(np.abs(a - b) / np.abs(b)))
      worst_normwise = max(worst_normwise, np.max(np.abs(a - b)) / np.max(np.abs(b)))
    for a, b in zip(jax.tree.leaves((state_ours.mu, state_ours.nu)),
                    jax.tree.leaves((state_stock.mu, state_stock.nu))):
      np.testing.assert_array_equal(a, b)
    assert all(int(c) == step + 1 for c in jax.tree.leaves(state_ours.count))
    assert int(state_stock.count) == step + 1
  print(f"\nper-parameter Adam vs optax.scale_by_adam, 6 steps, jit={jit}: worst relative "
        f"difference {worst_elementwise:.2e} elementwise, {worst_normwise:.2e} of the update scale")
  assert worst_normwise <= 3.6e-7  # 3 ulp
  if not jit:
    assert worst_elementwise <= 3.6e-7


def _grown_deit_params():
  """Tiny DeiT params with gated units, then linear units, on fc1."""
  problem = make_deit()
  spectrum = random_spectrum(problem.variables, layer_filter=lambda p: p == "blocks_0/mlp/fc1")
  variables = problem.variables
  for unit in ("gated", "linear"):
    plan = grow.select(spectrum, budget=10**6, rule="random", unit=unit, rng=jax.random.key(0))
    variables = grow.grow(variables, plan, spectrum)
  return variables["params"]


def test_decay_mask():
  params = _grown_deit_params()
  mask = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  decayed = {k for k, v in mask.items() if v}
  expected = {k for k in mask if k.endswith(("['kernel']", "['gated_r']", "['linear_w']"))}
  assert decayed == expected
  # What that covers, by name: every kernel (patch embedding, qkv, proj, fc1, fc2, head) and
  # the unit weights (gated r, linear w); none of biases, norms, position embedding, class
  # token, unit gains or the linear units' offsets.
  for name in ("['patch_embed']['kernel']", "['blocks_1']['attn']['qkv']['kernel']",
               "['blocks_0']['mlp']['fc2']['kernel']", "['head']['kernel']",
               "['blocks_0']['mlp']['fc1']['gated_r']", "['blocks_0']['mlp']['fc1']['linear_w']"):
    assert mask[name], name
  for name in ("['pos_embed']", "['cls_token']", "['norm']['scale']", "['norm']['bias']",
               "['blocks_0']['norm1']['scale']", "['blocks_0']['attn']['qkv']['bias']",
               "['blocks_0']['mlp']['fc1']['gated_a']", "['blocks_0']['mlp']['fc1']['linear_b']",
               "['patch_embed']['bias']"):
    assert not mask[name], name
  # adamw applies it: with zero gradients the update is -lr * wd * param exactly where masked.
  lr, wd = 0.01, 0.05
  tx = optim.adamw(lr, weight_decay=wd)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)):
    expected_update = -lr * wd * p if mask[jax.tree_util.keystr(path)] else jnp.zeros_like(p)
    np.testing.assert_allclose(u, expected_update, rtol=1e-6, atol=0)
