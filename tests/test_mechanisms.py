"""The two unit kinds, the first-order and largest-magnitude scores, by_kind allocation and
the unit ablation, each against an independent reference (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (capture_layer_statistics, exact_spectrum, explicit_splitting_matrices,
                      make_deit, make_mlp, params_grad)
from hetscale_jax import ablation, grow, layers, splitting
from hetscale_jax.splitting import Spectrum


def float64_problem(model):
  return make_mlp(jnp.float64) if model == "mlp" else make_deit(jnp.float64)


def node(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def perturbed_units(variables, scale=0.3, seed=0):
  """The variables with every unit parameter moved away from its insertion value, so that the
  units contribute (as after training)."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))

  def move(path, x):
    if layers.is_unit_direction(path[-1].key) or path[-1].key.endswith(("_a", "_b")):
      return x + scale * jax.random.normal(next(keys), x.shape, x.dtype)
    return x
  return {**variables, "params": jax.tree_util.tree_map_with_path(move, variables["params"])}


# ---------------------------------------------------------------------------------------------
# Unit kinds.


@pytest.mark.parametrize("model", ["mlp", "deit"])
def test_every_unit_kind_leaves_the_function_unchanged_at_insertion(x64, model):
  """Three events on the same neurons (gated, linear, linear: two units of one kind on one
  neuron, beside a unit of the other kind), each exact at insertion to float64 rounding, also
  beside units that already contribute."""
  problem = float64_problem(model)
  spectrum = exact_spectrum(problem)
  apply = jax.jit(lambda v: problem.model.apply(v, problem.batch[0]))
  variables = problem.variables
  for stage, unit in enumerate(("gated", "linear", "linear")):
    plan = grow.select(spectrum, budget=10**9, rule="random", unit=unit, max_layer_fraction=1.0,
                       rng=jax.random.key(0))
    grown = grow.grow(variables, plan, spectrum)
    assert float(jnp.max(jnp.abs(apply(grown) - apply(variables)))) <= 1e-12, (stage, unit)
    # The new stage is in the computation: moved off its insertion value, it changes the logits.
    assert float(jnp.max(jnp.abs(apply(perturbed_units(grown)) - apply(variables)))) > 1e-6
    variables = perturbed_units(grown, seed=stage)  # the next stage goes on top of live units
  kinds = {kind for layer in layers.grown_layers(variables).values() for kind in layer}
  assert kinds == {"gated", "linear"}


@pytest.mark.parametrize("model", ["mlp", "deit"])
def test_linear_unit_gradient_at_insertion_is_one_and_a_half_delta_x(x64, model):
  """dL/dp+ = dL/dp- = (1 + gelu'(0)) sum_t dL/dy_j x~ = 1.5 sum_t delta_j x~ at insertion
  (closed form from captured statistics), and Spectrum.gradient is sum_t delta_j x~, from the
  collected statistics and from the streamed method's own pass (output_gradients) alike."""
  problem = float64_problem(model)
  spectrum = exact_spectrum(problem)
  plan = grow.select(spectrum, budget=10**9, rule="random", unit="linear", max_layer_fraction=0.5,
                     rng=jax.random.key(1))
  grown = grow.grow(problem.variables, plan, spectrum)
  grads = params_grad(problem.loss_fn, grown, problem.batch)
  stats = capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch)
  streamed = jax.jit(splitting.output_gradients, static_argnums=0)(
      problem.loss_fn, problem.variables, problem.batch)
  for path, neurons in plan.indices.items():
    x_tilde, _, g = stats[path]
    closed_form = g.T @ x_tilde  # [d_out, d_in + 1]
    for gradient in (spectrum[path].gradient, streamed[path]):  # both methods' statistic
      np.testing.assert_allclose(gradient, closed_form, rtol=1e-10,
                                 atol=1e-12 * np.abs(closed_form).max())
    expected = 1.5 * closed_form[neurons]
    n = len(neurons)  # the first units fill the first slots
    w, b = node(grads, path)["linear_w"][:n], node(grads, path)["linear_b"][:n]
    for half in range(2):
      got = np.concatenate([w[:, half], b[:, half, None]], axis=-1)
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    assert grow.linear_unit_slope("gelu") == 1.5


# ---------------------------------------------------------------------------------------------
# Scores.


@pytest.mark.parametrize("model", ["mlp", "deit"])
def test_first_order_scores_against_the_weight_gradient(x64, model):
  """row_sum is the smallest eigenvalue of the released code's dense M = 1 g^T (g a neuron's
  kernel-gradient row, bias excluded; numpy eigvals), grad_norm the norm of the closed-form
  gradient of a linear unit at insertion, 1.5 |[dL/dW_j, dL/db_j]|."""
  problem = float64_problem(model)
  spectrum = exact_spectrum(problem)
  grads = params_grad(problem.loss_fn, problem.variables, problem.batch)
  row_sum, grad_norm = grow.scores(spectrum, "row_sum"), grow.scores(spectrum, "grad_norm")
  for path in spectrum:
    kernel_grad = np.asarray(node(grads, path)["kernel"]).T  # [d_out, d_in]
    bias_grad = np.asarray(node(grads, path)["bias"])
    scale = np.abs(kernel_grad).max()
    released = [np.min(np.linalg.eigvals(np.outer(np.ones_like(g), g)).real) for g in kernel_grad]
    # M's zero eigenvalue is defective (a Jordan block), so dense eig finds it only to about
    # sqrt(eps) |g|: the rounding that makes the released code's zeros slightly negative.
    np.testing.assert_allclose(row_sum[path], released, rtol=1e-8, atol=1e-7 * scale)
    assert np.all(row_sum[path] <= 0)
    full = np.concatenate([kernel_grad, bias_grad[:, None]], axis=1)
    np.testing.assert_allclose(-grad_norm[path], 1.5 * np.linalg.norm(full, axis=1), rtol=1e-10)


@pytest.mark.parametrize("model", ["mlp", "deit"])
def test_largest_magnitude_score_and_direction_against_dense_eigh(x64, model):
  """splitting_abs scores -max(|lambda_min|, |lambda_max|) / input scale from dense eigh of the
  explicit splitting matrices, and its units point along that eigenvalue's eigenvector."""
  problem = float64_problem(model)
  spectrum = exact_spectrum(problem)
  matrices = explicit_splitting_matrices(
      capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch))
  score = grow.scores(spectrum, "splitting_abs")
  plan = grow.select(spectrum, budget=10**9, rule="splitting_abs", max_layer_fraction=1.0)
  assert plan.direction == "extreme"
  grown = grow.grow(problem.variables, plan, spectrum, unit_scale=1.0)
  took_max = 0
  for path, s in spectrum.items():
    eigvals, eigvecs = np.linalg.eigh(matrices[path])
    extreme = np.where(np.abs(eigvals[:, -1]) > np.abs(eigvals[:, 0]), eigvals[:, -1], eigvals[:, 0])
    scale = float(s.input_scale)
    np.testing.assert_allclose(score[path], -np.abs(extreme) / scale, rtol=1e-8,
                               atol=1e-10 * np.abs(eigvals).max() / scale)
    np.testing.assert_allclose(s.eigvals_max, eigvals[:, -1], rtol=1e-8,
                               atol=1e-10 * np.abs(eigvals).max())
    larger = np.abs(eigvals[:, -1]) > np.abs(eigvals[:, 0])
    gap = np.abs(np.abs(eigvals[:, -1]) - np.abs(eigvals[:, 0])) > 1e-6 * np.abs(eigvals).max()
    reference = np.where(larger[:, None], eigvecs[:, :, -1], eigvecs[:, :, 0])
    neurons = plan.indices[path]
    r = np.asarray(node(grown["params"], path)["gated_r"])[:len(neurons)] * np.sqrt(scale)
    cosine = np.abs(np.sum(r * reference[neurons], axis=1))
    np.testing.assert_allclose(cosine[gap[neurons]], 1.0, atol=1e-6)
    took_max += int(np.sum(larger[neurons] & gap[neurons]))
  assert took_max > 0  # some units do take the largest eigenvalue's vector


# ---------------------------------------------------------------------------------------------
# by_kind allocation, on a hand-made spectrum.


def scored_layer(scores, d_in):
  """A Spectrum whose splitting score (normalised smallest eigenvalue) is `scores`."""
  scores = np.asarray(scores, np.float64)
  d_out = len(scores)
  zeros = np.zeros((d_out, d_in + 1))
  return Spectrum(eigvals=scores, eigvecs=zeros, residuals=np.zeros(d_out), eigvals_max=scores,
                  eigvecs_max=zeros, input_scale=np.float64(1.0), start_dirs=zeros,
                  start_rayleigh=np.zeros(d_out), gradient=zeros)


def test_by_kind_quotas_candidates_and_layer_limit():
  """Four kinds, one quota each. fc1: blocks 0..3 reach 3 candidates (negative scores) in the
  order 2, 0, 3 (block 1 has only 2), so with max_layers_per_kind 2 only blocks 2 and 0 grow.
  qkv: one layer, its quota caps it. proj: no candidate, nothing grows (its quota is not
  given to others). fc2: a layer whose units cost more than its quota never grows."""
  d_in = 4  # a gated unit costs 6 parameters
  spectrum = {
      "b0/fc1": scored_layer([-5, -4, -3.5, 1, 1, 1], d_in),
      "b1/fc1": scored_layer([-10, -9, 1, 1, 1, 1], d_in),
      "b2/fc1": scored_layer([-8, -7, -6, -0.5, 1, 1], d_in),
      "b3/fc1": scored_layer([-3, -2.5, -2, -1.9, 1, 1], d_in),
      "b0/qkv": scored_layer([-1.0] * 20, d_in),
      "b0/proj": scored_layer([1.0] * 6, d_in),
      "b0/fc2": scored_layer([-1.0] * 6, 60),
  }
  budget = 4 * 60
  plan = grow.select(spectrum, budget=budget, allocation="by_kind", min_candidates=3,
                     max_layers_per_kind=2, max_layer_fraction=1.0)
  quota = budget // 4
  per_kind = {}
  for path, neurons in plan.indices.items():
    per_kind[grow.layer_kind(path)] = per_kind.get(grow.layer_kind(path), 0) + len(neurons) * 6
  assert all(cost <= quota for cost in per_kind.values()), per_kind
  assert sorted(p for p in plan.indices if p.endswith("fc1")) == ["b0/fc1", "b2/fc1"]
  # fc1's quota buys 10 units: the 7 candidates of blocks 2 and 0, most negative first.
  assert {p: list(plan.indices[p]) for p in ("b0/fc1", "b2/fc1")} == {
      "b0/fc1": [0, 1, 2], "b2/fc1": [0, 1, 2, 3]}
  assert len(plan.indices["b0/qkv"]) == quota // 6
  assert "b0/proj" not in plan.indices and "b0/fc2" not in plan.indices
  # A higher bar: only blocks 2 and 3 have 4 candidates, block 3 reaching its 4th first.
  plan = grow.select(spectrum, budget=budget, allocation="by_kind", min_candidates=4,
                     max_layers_per_kind=2, max_layer_fraction=1.0)
  assert sorted(p for p in plan.indices if p.endswith("fc1")) == ["b2/fc1", "b3/fc1"]
  # Global allocation ignores kinds: the most negative per parameter anywhere first.
  plan = grow.select(spectrum, budget=12, max_layer_fraction=1.0)
  assert {p: list(i) for p, i in plan.indices.items()} == {"b1/fc1": [0, 1]}


# ---------------------------------------------------------------------------------------------
# Unit ablation.


def test_switching_every_unit_off_gives_the_ungrown_function(x64):
  problem = make_deit(jnp.float64)
  spectrum = exact_spectrum(problem)
  variables = problem.variables
  for unit in ("gated", "linear"):
    plan = grow.select(spectrum, budget=10**9, rule="random", unit=unit, max_layer_fraction=0.5,
                       rng=jax.random.key(2))
    variables = perturbed_units(grow.grow(variables, plan, spectrum))
  apply = jax.jit(lambda v: problem.model.apply(v, problem.batch[0]))
  before = apply(problem.variables)
  assert float(jnp.max(jnp.abs(apply(variables) - before))) > 1e-3  # the units contribute
  off = layers.switch_off_units(variables)
  # Every unit then adds exactly 0; the rest of the program may round in another order.
  np.testing.assert_allclose(apply(off), before, rtol=0, atol=1e-13)
  # Contributions: mean |y - z| over tokens, per grown neuron, against two applies of one layer.
  _, sown = problem.model.apply(variables, problem.batch[0], mutable=[layers.CONTRIBUTION[0]])
  contributions = ablation.mean_contributions(sown[layers.CONTRIBUTION[0]], variables)
  assert set(contributions) == set(spectrum) and all(v > 0 for v in contributions.values())
  _, sown_off = problem.model.apply(off, problem.batch[0], mutable=[layers.CONTRIBUTION[0]])
  assert all(v == 0 for v in ablation.mean_contributions(sown_off[layers.CONTRIBUTION[0]],
                                                        off).values())
  result = ablation.unit_ablation(
      lambda v: {"loss": float(problem.loss_fn(v, problem.batch)), "top1": 0.5},
      lambda v: problem.model.apply(v, problem.batch[0], mutable=[layers.CONTRIBUTION[0]])[1][
          layers.CONTRIBUTION[0]],
      variables, intact={"loss": float(problem.loss_fn(variables, problem.batch)), "top1": 0.5})
  assert result["units_off"]["loss"] == pytest.approx(float(problem.loss_fn(problem.variables,
                                                                            problem.batch)))
  assert "unit ablation" in ablation.describe(result)
