"""The batched Lanczos and its tridiagonal solver on their own, against numpy.linalg.eigh: random
symmetric matrices in batches, entries smaller than the number of iterations, breakdowns that
need a restart, unconverged residuals, and the dtype of the start vectors kept throughout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetscale_jax import lanczos


def random_symmetric(rng, shape):
  m = rng.normal(size=shape)
  return 0.5 * (m + np.swapaxes(m, -1, -2))


def random_starts(rng, shape):
  v = rng.normal(size=shape)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def products(v, m):
  return np.einsum("...ij,...j->...i", m, v)


def run_lanczos(matrices, start, num_iters, dtype=jnp.float64, seed=0):
  """lanczos_extremes on explicit matrices {p: [..., n, n]} as the only access to them: their
  products. Returns {p: RitzPairs} in NumPy."""
  matrices = {p: jnp.asarray(m, dtype) for p, m in matrices.items()}
  start = {p: jnp.asarray(v, dtype) for p, v in start.items()}

  @jax.jit
  def solve(matrices, start, key):
    hvp = lambda vecs: {p: jnp.einsum("...ij,...j->...i", matrices[p], v) for p, v in vecs.items()}
    return lanczos.lanczos_extremes(hvp, start, key, num_iters)
  out = solve(matrices, start, jax.random.key(seed))
  for p, pair in out.items():
    assert all(a.dtype == dtype for a in pair), p  # every step in the start vectors' dtype
  return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def assert_extreme_pairs(result, matrices, val_tol, vec_tol):
  """Smallest pairs: eigenvalues, explicit and returned residuals (relative to |S|),
  eigenvectors up to sign where the smallest eigenvalue is simple. Largest pairs: eigenvalues,
  explicit residuals and eigenvectors likewise."""
  for p, m in matrices.items():
    theta, vec, residual = result[p].eigvals, result[p].eigvecs, result[p].residuals
    eigvals, eigvecs = np.linalg.eigh(m)
    norm = np.max(np.abs(eigvals), axis=-1)
    assert np.max(np.abs(theta - eigvals[..., 0]) / norm) <= val_tol, p
    np.testing.assert_allclose(np.linalg.norm(vec, axis=-1), 1.0, rtol=10 * val_tol)
    explicit = np.linalg.norm(products(vec, m) - theta[..., None] * vec, axis=-1)
    assert np.max(explicit / norm) <= val_tol, p
    assert np.max(residual / norm) <= val_tol, p
    if m.shape[-1] > 1:
      simple = (eigvals[..., 1] - eigvals[..., 0]) / norm > 1e-3
      ref = eigvecs[..., 0]
      sign = np.sign(np.sum(ref * vec, axis=-1))[..., None]
      assert np.max(np.abs(vec * sign - ref)[simple]) <= vec_tol, p
    theta_max, vec_max = result[p].eigvals_max, result[p].eigvecs_max
    assert np.max(np.abs(theta_max - eigvals[..., -1]) / norm) <= val_tol, p
    explicit = np.linalg.norm(products(vec_max, m) - theta_max[..., None] * vec_max, axis=-1)
    assert np.max(explicit / norm) <= val_tol, p
    if m.shape[-1] > 1:
      simple = (eigvals[..., -1] - eigvals[..., -2]) / norm > 1e-3
      ref = eigvecs[..., -1]
      sign = np.sign(np.sum(ref * vec_max, axis=-1))[..., None]
      assert np.max(np.abs(vec_max * sign - ref)[simple]) <= vec_tol, p


@pytest.mark.parametrize("dtype, val_tol, vec_tol", [(jnp.float64, 1e-12, 1e-8),
                                                     (jnp.float32, 1e-5, 1e-3)])
def test_complete_basis_matches_eigh(x64, dtype, val_tol, vec_tol):
  """num_iters = n: the Krylov basis is complete and every smallest eigenpair is exact to
  rounding. One entry holds a [layers, neurons] batch of 9 x 9 matrices; another 3 x 3
  matrices, fewer dimensions than iterations, whose basis is complete after 3 vectors."""
  rng = np.random.default_rng(0)
  matrices = {"batched": random_symmetric(rng, (2, 5, 9, 9)),
              "small": random_symmetric(rng, (4, 3, 3))}
  start = {p: random_starts(rng, m.shape[:-1]) for p, m in matrices.items()}
  result = run_lanczos(matrices, start, num_iters=9, dtype=dtype)
  assert_extreme_pairs(result, matrices, val_tol, vec_tol)
  for p, m in matrices.items():
    v = np.asarray(jnp.asarray(start[p], dtype), np.float64)
    np.testing.assert_allclose(result[p].start_rayleigh, np.einsum("...i,...ij,...j->...", v, m, v),
                               rtol=10 * val_tol, atol=10 * val_tol * np.abs(m).max())


def block_diagonal_hidden_minimum(rng, batch, n_first, n_second):
  """Block-diagonal matrices whose smallest eigenvalue lies in the second block, and unit
  start vectors within the first block: their Krylov sequence stays in the first block, breaks
  down after n_first vectors, and only a restart reaches the smallest eigenvalue."""
  n = n_first + n_second
  first = random_symmetric(rng, (batch, n_first, n_first))
  first += (np.abs(np.linalg.eigvalsh(first)).max() + 1.0) * np.eye(n_first)  # positive definite
  second = random_symmetric(rng, (batch, n_second, n_second)) - 3.0 * np.eye(n_second)
  m = np.zeros((batch, n, n))
  m[:, :n_first, :n_first], m[:, n_first:, n_first:] = first, second
  start = np.zeros((batch, n))
  start[:, :n_first] = random_starts(rng, (batch, n_first))
  assert np.all(np.linalg.eigvalsh(first)[:, 0] > np.linalg.eigvalsh(m)[:, 0] + 1.0)
  return m, start


def low_rank_indefinite(rng, batch, n, rank):
  """sum of `rank` weighted outer products, weights of both signs: what a splitting matrix with
  fewer probe tokens than inputs looks like. Its Krylov sequences break down after rank + 1
  vectors (the null space is one eigenvalue)."""
  x = rng.normal(size=(batch, rank, n))
  w = rng.normal(size=(batch, rank))
  m = np.einsum("bt,bti,btj->bij", w, x, x)
  assert np.all(np.linalg.matrix_rank(m) == rank)
  return m, random_starts(rng, (batch, n))


def test_breakdown_restarts_and_still_matches_eigh(x64):
  """Sequences that find an invariant subspace before num_iters: a restart with a fresh
  orthogonalised direction continues them, and with a complete basis the pairs are exact."""
  rng = np.random.default_rng(1)
  hidden, hidden_start = block_diagonal_hidden_minimum(rng, batch=6, n_first=3, n_second=5)
  low_rank, low_rank_start = low_rank_indefinite(rng, batch=6, n=8, rank=3)
  matrices = {"hidden": hidden, "low_rank": low_rank}
  result = run_lanczos(matrices, {"hidden": hidden_start, "low_rank": low_rank_start}, num_iters=8)
  assert_extreme_pairs(result, matrices, val_tol=1e-12, vec_tol=1e-8)


def test_residuals_and_ritz_values_before_convergence(x64):
  """3 iterations on 12 x 12 matrices: the residuals from the recurrence (|beta_k y_k|) equal
  |S v - theta v| of the returned pair, and the Ritz value lies above the smallest eigenvalue."""
  rng = np.random.default_rng(2)
  matrices = {"m": random_symmetric(rng, (40, 12, 12))}
  result = run_lanczos(matrices, {"m": random_starts(rng, (40, 12))}, num_iters=3)
  theta, vec, residual = result["m"].eigvals, result["m"].eigvecs, result["m"].residuals
  m = matrices["m"]
  eigvals = np.linalg.eigvalsh(m)
  norm = np.max(np.abs(eigvals), axis=-1)
  explicit = np.linalg.norm(products(vec, m) - theta[:, None] * vec, axis=-1)
  assert np.median(explicit / norm) > 1e-3  # not converged: the check means something
  np.testing.assert_allclose(residual, explicit, rtol=1e-10)
  assert np.all(theta >= eigvals[:, 0] - 1e-12 * norm)


@pytest.mark.parametrize("k", [1, 2, 5, 24, 60])
def test_tridiagonal_smallest_pair_matches_eigh(x64, k):
  """The Ritz step without LAPACK: against numpy's eigh, including decoupled matrices (a zero
  off-diagonal, as after a Lanczos breakdown)."""
  rng = np.random.default_rng(k)
  a, b = rng.normal(size=(300, k)), rng.normal(size=(300, k - 1))
  if k > 2:
    b[::5, k // 2] = 0.0
  matrices = np.zeros((300, k, k))
  i = np.arange(k)
  matrices[:, i, i] = a
  matrices[:, i[:-1], i[:-1] + 1] = matrices[:, i[:-1] + 1, i[:-1]] = b
  eigvals, eigvecs = np.linalg.eigh(matrices)
  theta, z = jax.jit(lanczos.tridiagonal_smallest_pair)(jnp.asarray(a), jnp.asarray(b))
  theta, z = np.asarray(theta), np.asarray(z)
  norm = np.max(np.abs(eigvals), axis=-1)
  assert np.max(np.abs(theta - eigvals[:, 0]) / norm) <= 1e-14
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-12)
  residual = np.einsum("bij,bj->bi", matrices, z) - theta[:, None] * z
  assert np.max(np.linalg.norm(residual, axis=-1) / norm) <= 1e-14
  if k > 1:
    simple = (eigvals[:, 1] - eigvals[:, 0]) / norm > 1e-3
    sign = np.sign(np.sum(z * eigvecs[:, :, 0], axis=-1))[:, None]
    assert np.max(np.abs(z * sign - eigvecs[:, :, 0])[simple]) <= 1e-11
