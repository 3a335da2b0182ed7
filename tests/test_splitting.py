"""The splitting spectrum: matrix-free HVP against the closed form, block structure of the probe
Hessian, Lanczos against dense eigh, averaging over batches, breakdown, the layer filter,
parameters and data of different dtypes, and convergence at the default number of iterations
on a DeiT-Ti-shaped model. The Lanczos solver alone is tested in test_lanczos.py."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (capture_layer_statistics, explicit_splitting_matrices, make_deit, make_mlp,
                      relative_error)
from hetscale_jax import grow, layers, splitting

METHODS = ("collected", "streamed")


def add_live_units(problem, seed=7):
  """The problem's model with one stage of units (non-zero gains) on two layers, so that
  "z is the neuron's current output, earlier units included" is exercised."""
  params = problem.variables["params"]
  units = {}
  key = jax.random.key(seed)
  for path, index in (("dense_0", [0, 3, 5]), ("dense_1", [1, 2])):
    kernel = params[path]["kernel"]
    key, k1, k2 = jax.random.split(key, 3)
    units[path] = (index, 0.5 * jax.random.normal(k1, (len(index), kernel.shape[0] + 1), kernel.dtype),
                   1.0 + jax.random.uniform(k2, (len(index),), kernel.dtype))
  return dataclasses.replace(problem, variables=grow.add_units(problem.variables, units))


def problem_for(name):
  """Float64 problems (call with x64 enabled): the MLP with a stage of live units, the tiny
  DeiT as initialised."""
  if name == "mlp":
    return add_live_units(make_mlp(jnp.float64))
  return make_deit(jnp.float64)


def closed_form_hvp(stats, vecs):
  """{path: [S_j v_j]_j} = sum_t g s''(z) x~ (x~ . v_j), from independently captured stats."""
  matrices = explicit_splitting_matrices(stats)
  return {p: np.einsum("jik,jk->ji", matrices[p], np.asarray(v)) for p, v in vecs.items()}


def random_vectors(stats, seed=0, dtype=jnp.float64):
  key = jax.random.key(seed)
  out = {}
  for i, (path, (x_tilde, z, _)) in enumerate(sorted(stats.items())):
    out[path] = jax.random.normal(jax.random.fold_in(key, i), (z.shape[1], x_tilde.shape[1]), dtype)
  return out


def hvp_for(method, problem, batch):
  """V -> {path: S V} by the code under test (jit it: eager op-by-op dispatch is slow)."""
  activations = {p: "gelu" for p in splitting.find_growable_layers(
      problem.loss_fn, problem.variables, batch if not isinstance(batch, list) else batch[0])}
  if method == "collected":
    stats = splitting.collect_layer_statistics(problem.loss_fn, problem.variables, batch)
    return splitting.collected_hvp(stats, activations)
  return splitting.streamed_hvp(problem.loss_fn, problem.variables, batch, activations)


@pytest.mark.parametrize("model", ["mlp", "deit"])
@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_closed_form(x64, method, model):
  problem = problem_for(model)
  stats = capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch)
  vecs = random_vectors(stats)
  expected = closed_form_hvp(stats, vecs)
  actual = jax.jit(lambda v: hvp_for(method, problem, problem.batch)(v))(vecs)
  assert sorted(actual) == sorted(expected)
  for path in expected:
    assert np.max(np.abs(expected[path])) > 1e-6, path  # a non-trivial product
    assert relative_error(actual[path], expected[path]) <= 1e-10, path


def test_probe_hessian_is_block_diagonal(x64):
  """The full Hessian of the streamed loss in the probe parameters D (all layers, all neurons):
  only the per-neuron diagonal blocks are non-zero, and they are the S_j."""
  problem = problem_for("mlp")
  stats = capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch)
  matrices = explicit_splitting_matrices(stats)
  hvp = hvp_for("streamed", problem, problem.batch)
  # hvp is jvp(grad(loss_in_probe)) at D = 0: its Jacobian is jax.hessian(loss_in_probe)(0).
  hessian = jax.jit(jax.jacfwd(hvp))(jax.tree.map(jnp.zeros_like, random_vectors(stats)))
  for p in stats:
    for q in stats:
      block = np.asarray(hessian[p][q])  # [d_out_p, n_p, d_out_q, n_q]
      if p != q:
        assert np.max(np.abs(block)) <= 1e-12, (p, q)
        continue
      d_out = block.shape[0]
      for j in range(d_out):
        for k in range(d_out):
          if j == k:
            assert relative_error(block[j, :, j, :], matrices[p][j]) <= 1e-10, (p, j)
          else:
            assert np.max(np.abs(block[j, :, k, :])) <= 1e-12, (p, j, k)


def assert_eigenpairs_match(spectrum, matrices, vec_tol=1e-6, val_tol=1e-8):
  for path, s in spectrum.items():
    eigvals, eigvecs = np.linalg.eigh(matrices[path])
    lam, vec = np.asarray(s.eigvals), np.asarray(s.eigvecs)
    norm = np.max(np.abs(eigvals), axis=-1)
    assert np.all(norm > 0), path
    # Relative to |lambda|, or to |S| where lambda is (numerically) zero.
    denom = np.maximum(np.abs(eigvals[:, 0]), 1e-6 * norm)
    assert np.max(np.abs(lam - eigvals[:, 0]) / denom) <= val_tol, path
    residual = np.einsum("jik,jk->ji", matrices[path], vec) - lam[:, None] * vec
    assert np.max(np.linalg.norm(residual, axis=-1) / norm) <= 1e-9, path
    assert np.max(np.asarray(s.residuals) / norm) <= 1e-9, path
    # Eigenvectors up to sign, where the smallest eigenvalue is simple.
    gap = (eigvals[:, 1] - eigvals[:, 0]) / norm
    simple = gap > 1e-6
    ref = eigvecs[:, :, 0]
    sign = np.sign(np.sum(ref * vec, axis=-1))[:, None]
    assert np.max(np.abs(vec * sign - ref)[simple]) <= vec_tol, path


# The non-DeiT MLP with both methods; the tiny DeiT with the default method (the streamed
# products on a DeiT are checked in test_hvp_matches_closed_form).
@pytest.mark.parametrize("model, method", [("mlp", "collected"), ("mlp", "streamed"),
                                           ("deit", "collected")])
def test_lanczos_matches_dense_eigh(x64, method, model):
  """With num_iters = d_in + 1 the Krylov basis is complete: every neuron's smallest
  eigenpair equals dense eigh's to rounding, also where S_j is low rank (breakdown)."""
  problem = make_mlp(jnp.float64) if model == "mlp" else make_deit(jnp.float64)
  stats = capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch)
  matrices = explicit_splitting_matrices(stats)
  num_iters = max(m.shape[-1] for m in matrices.values())
  spectrum = splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch,
                                          num_iters=num_iters, method=method)
  assert sorted(spectrum) == sorted(matrices)
  # Both cases occur: full-rank S_j, and S_j of rank (tokens) < d_in + 1, where the Krylov
  # sequence hits an invariant subspace and must restart to reach the smallest eigenvalue.
  tokens = next(iter(stats.values()))[0].shape[0]
  full_rank = {p: m.shape[-1] <= tokens for p, m in matrices.items()}
  assert any(full_rank.values()) and not all(full_rank.values()), full_rank
  for path, m in matrices.items():
    if not full_rank[path]:
      assert max(np.linalg.matrix_rank(s) for s in m) <= tokens < m.shape[-1], path
  assert_eigenpairs_match(spectrum, matrices)
  for path, s in spectrum.items():
    x_tilde = stats[path][0]
    np.testing.assert_allclose(float(s.input_scale), np.mean(np.sum(x_tilde**2, -1)), rtol=1e-12)
    start = np.asarray(s.start_dirs)
    np.testing.assert_allclose(np.linalg.norm(start, axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(s.start_rayleigh),
                               np.einsum("ji,jik,jk->j", start, matrices[path], start),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_residuals_are_those_of_the_returned_pairs(x64, method):
  """Before convergence too: the residuals come from the Lanczos recurrence (|beta_k y_k|),
  not from another product, and must equal |S v - lambda v| of the returned pair."""
  problem = add_live_units(make_mlp(jnp.float64))
  matrices = explicit_splitting_matrices(
      capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch))
  spectrum = splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch,
                                          num_iters=3, method=method)
  for path, s in spectrum.items():
    vec, lam = np.asarray(s.eigvecs), np.asarray(s.eigvals)
    explicit = np.linalg.norm(np.einsum("jik,jk->ji", matrices[path], vec) - lam[:, None] * vec,
                              axis=-1)
    norm = np.max(np.abs(np.linalg.eigvalsh(matrices[path])), axis=-1)
    assert np.median(explicit / norm) > 1e-3, path  # not converged: the check means something
    np.testing.assert_allclose(np.asarray(s.residuals), explicit, rtol=1e-8, atol=1e-12 * norm.max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("same_shapes", [False, True])
def test_list_of_batches_averages_their_matrices(x64, method, same_shapes):
  """Batches of different sizes: each batch's matrix counts once, whatever its token count;
  batches of one shape (collected in one program body, batch after batch) alike."""
  problem = make_mlp(jnp.float64)
  batches = [problem.batch, (problem.make_batch(7) if same_shapes else
                             make_mlp(jnp.float64, batch_size=2, tokens=5).batch)]
  per_batch = [capture_layer_statistics(problem.loss_fn, problem.variables, b) for b in batches]
  vecs = random_vectors(per_batch[0])
  products = [closed_form_hvp(stats, vecs) for stats in per_batch]
  actual = jax.jit(lambda v: hvp_for(method, problem, batches)(v))(vecs)
  for path in vecs:
    expected = 0.5 * (products[0][path] + products[1][path])
    assert relative_error(actual[path], expected) <= 1e-10, path
    # Not the matrix of one batch alone, nor of the pooled tokens.
    assert relative_error(products[0][path], expected) > 1e-3, path
  if method == "collected":
    matrices = [explicit_splitting_matrices(stats) for stats in per_batch]
    average = {p: 0.5 * (matrices[0][p] + matrices[1][p]) for p in matrices[0]}
    spectrum = splitting.splitting_spectrum(problem.loss_fn, problem.variables, batches,
                                            num_iters=8, method=method)
    assert_eigenpairs_match(spectrum, average)


def count_primitive(jaxpr, name: str) -> int:
  """How often primitive `name` occurs in a jaxpr, its sub-jaxprs (jit, loops, conds) included."""
  return (sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
          + sum(count_primitive(sub, name) for sub in jax.extend.core.subjaxprs(jaxpr)))


def all_but_dense_1(path):
  return path != "dense_1"


@pytest.mark.parametrize("method", METHODS)
def test_layer_filter_leaves_out_excluded_layers(x64, method):
  """Excluding dense_1 leaves the other layers' spectra as they are without a filter, and the
  excluded layer costs nothing: no statistics are collected for it and the spectrum has fewer
  matmuls (a filter applied to the result would leave their number unchanged)."""
  problem = make_mlp(jnp.float64)

  def spectrum_of(layer_filter):
    # num_iters as in test_lanczos_matches_dense_eigh, whose compiled unfiltered spectrum is reused.
    return splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch,
                                        num_iters=8, method=method, layer_filter=layer_filter)
  full, filtered = spectrum_of(None), spectrum_of(all_but_dense_1)
  assert sorted(full) == ["dense_0", "dense_1", "out"]
  assert sorted(filtered) == ["dense_0", "out"]
  for path, s in filtered.items():
    np.testing.assert_array_equal(s.start_dirs, full[path].start_dirs, err_msg=path)
    scale = float(jnp.max(jnp.abs(full[path].eigvals)))
    for field in ("eigvals", "eigvecs", "residuals", "input_scale", "start_rayleigh"):
      np.testing.assert_allclose(getattr(s, field), getattr(full[path], field), rtol=1e-12,
                                 atol=1e-14 * scale, err_msg=f"{path} {field}")

  statistics = jax.eval_shape(lambda v, b: splitting.collect_layer_statistics(
      problem.loss_fn, v, b, all_but_dense_1), problem.variables, problem.batch)
  assert sorted(statistics) == ["dense_0", "out"]
  matmuls = {f: count_primitive(jax.make_jaxpr(lambda f=f: spectrum_of(f))().jaxpr, "dot_general")
             for f in (None, all_but_dense_1)}
  assert matmuls[all_but_dense_1] < matmuls[None], matmuls


class MixedPrecisionMLP(nn.Module):
  """Token-wise MLP of GrowableDense layers with float32 parameters (their default), computing
  in `dtype` (None: the dtype that the inputs and parameters promote to)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(layers.GrowableDense(8, dtype=self.dtype, name="dense_0")(x), approximate=False)
    return layers.GrowableDense(4, dtype=self.dtype, name="out")(x)


def mixed_precision_problem(dtype, input_dtype):
  """(model, float32 variables, (inputs in input_dtype, labels), loss_fn) on 6 tokens."""
  model = MixedPrecisionMLP(dtype=dtype)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  batch = (jax.random.normal(k1, (2, 3, 5), input_dtype), jax.random.randint(k2, (2, 3), 0, 4))
  variables = jax.jit(model.init)(k3, batch[0])
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

  def loss_fn(variables, batch):
    logits = model.apply(variables, batch[0]).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))
  return model, variables, batch, loss_fn


def assert_finite_and_exact_growth(model, variables, batch, spectrum, statistics_dtype):
  """Every neuron of every layer has a finite eigenpair computed in statistics_dtype, and exact
  growth on it leaves the outputs unchanged to the rounding of the output dtype, while the same
  units with gain 1 change them."""
  assert sorted(spectrum) == ["dense_0", "out"]
  for path, s in spectrum.items():
    assert s.eigvals.shape == variables["params"][path]["bias"].shape, path
    for name, value in jax.tree_util.tree_leaves_with_path(s):  # the arrays, not the activation
      assert value.dtype == statistics_dtype, (path, name)
      assert np.all(np.isfinite(np.asarray(value))), (path, name)
  plan = grow.select(spectrum, budget=10_000, threshold=0.0)
  assert plan.indices, "no neuron to grow: the check would mean nothing"
  apply = jax.jit(model.apply)
  before = apply(variables, batch[0])
  tol = float(jnp.finfo(before.dtype).eps) * float(jnp.max(jnp.abs(before)))  # one rounding
  exact = apply(grow.grow(variables, plan, spectrum, mode="exact"), batch[0])
  assert float(jnp.max(jnp.abs(exact - before))) <= tol
  split = apply(grow.grow(variables, plan, spectrum, mode="split"), batch[0])
  assert float(jnp.max(jnp.abs(split - before))) > 10 * tol


@pytest.mark.parametrize("method", METHODS)
def test_float32_params_with_float64_data(x64, method):
  """Data promoted above the parameters' dtype: every layer's solve runs in its statistics'
  dtype (float64 here), so the eigenpairs match dense eigh to float64 rounding."""
  model, variables, batch, loss_fn = mixed_precision_problem(None, jnp.float64)
  spectrum = splitting.splitting_spectrum(loss_fn, variables, batch, num_iters=9, method=method)
  assert_finite_and_exact_growth(model, variables, batch, spectrum, jnp.float64)
  assert_eigenpairs_match(spectrum, explicit_splitting_matrices(
      capture_layer_statistics(loss_fn, variables, batch)))


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_activations_with_float32_params(method):
  """bfloat16 activations: statistics, probe and solve run in float32."""
  model, variables, batch, loss_fn = mixed_precision_problem(jnp.bfloat16, jnp.float32)
  spectrum = splitting.splitting_spectrum(loss_fn, variables, batch, num_iters=9, method=method)
  assert_finite_and_exact_growth(model, variables, batch, spectrum, jnp.float32)


def test_argument_and_model_errors():
  problem = make_mlp()
  with pytest.raises(ValueError, match="method"):
    splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch, method="dense")
  with pytest.raises(ValueError, match="num_iters"):
    splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch, num_iters=0)
  with pytest.raises(ValueError, match="layer_filter"):
    splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch,
                                 layer_filter=lambda path: False)
  with pytest.raises(ValueError, match="no GrowableDense"):
    splitting.find_growable_layers(lambda v, b: jnp.sum(b[0]), problem.variables, problem.batch)

  class Shared(nn.Module):  # one GrowableDense called twice: no per-call spectrum
    @nn.compact
    def __call__(self, x):
      dense = layers.GrowableDense(5)
      return dense(dense(x))

  x = jnp.ones((2, 5))
  variables = Shared().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="more than once"):
    splitting.find_growable_layers(lambda v, b: jnp.sum(Shared().apply(v, b)), variables, x)


def test_default_num_iters_converges_on_deit_ti_shapes():
  """DeiT-Ti widths (192, 3 heads, MLP 768), depth 1, 32 px patch 8, batch 8 (136 tokens),
  float32, every neuron against dense float64 eigh. The default num_iters is chosen for what
  growth uses: the neurons a growth event picks (most negative eigenvalues, which Lanczos
  finds first) and their eigenvalues. Neurons with eigenvalues near zero converge last and are
  reported, not asserted: they are never picked."""
  problem = make_deit(jnp.float32, batch_size=8, img_size=32, num_classes=10, width=192,
                      num_heads=3, depth=1, mlp_dim=768, patch_size=8)
  stats = capture_layer_statistics(problem.loss_fn, problem.variables, problem.batch)
  exact = {p: np.linalg.eigvalsh(m) for p, m in explicit_splitting_matrices(stats).items()}
  # The default method only: the streamed products equal the collected ones
  # (test_hvp_matches_closed_form) and Lanczos does not know which it is given.
  spectrum = splitting.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch)
  relative, to_norm = [], []
  for path, eigvals in exact.items():
    lam, smallest = np.asarray(spectrum[path].eigvals, np.float64), eigvals[:, 0]
    norm = np.max(np.abs(eigvals), axis=-1)
    relative.append(np.abs(lam - smallest) / np.maximum(np.abs(smallest), 1e-6 * norm))
    to_norm.append(np.abs(lam - smallest) / norm)
  relative, to_norm = np.concatenate(relative), np.concatenate(to_norm)

  # A growth event's choice with a budget of one neuron in ten, from Lanczos and from dense.
  budget = sum(len(e) // 10 * grow.spectrum_unit_cost(spectrum[p], "gated") for p, e in exact.items())
  dense = {p: s.replace(eigvals=jnp.asarray(exact[p][:, 0], jnp.float32)) for p, s in spectrum.items()}
  plan, dense_plan = grow.select(spectrum, budget=budget), grow.select(dense, budget=budget)
  chosen = np.concatenate([np.abs(np.asarray(spectrum[p].eigvals, np.float64)[i] - exact[p][i, 0])
                           / np.abs(exact[p][i, 0]) for p, i in dense_plan.indices.items()])
  stats_of = lambda e: f"median {np.median(e):.2e}  p90 {np.percentile(e, 90):.2e}  max {e.max():.2e}"
  print(f"\nDeiT-Ti shapes, depth 1, {stats['blocks_0/mlp/fc1'][0].shape[0]} probe tokens, "
        f"num_iters = DEFAULT_NUM_ITERS = {splitting.DEFAULT_NUM_ITERS}, float32, {len(relative)} "
        f"neurons vs dense float64 eigh\n"
        f"  all neurons: |dlambda|/|lambda| {stats_of(relative)}\n"
        f"               |dlambda|/|S_j|    {stats_of(to_norm)}\n"
        f"  the {len(chosen)} neurons a growth event picks: |dlambda|/|lambda| {stats_of(chosen)}")
  assert np.median(relative) <= 1e-3
  assert len(chosen) >= 50  # a real choice
  assert plan.indices.keys() == dense_plan.indices.keys()
  for path, indices in dense_plan.indices.items():
    np.testing.assert_array_equal(plan.indices[path], indices, err_msg=path)
  assert chosen.max() <= 1e-4  # float32 rounding, not an unconverged eigenvalue
