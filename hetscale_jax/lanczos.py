"""The extreme eigenpairs of many symmetric matrices at once, from matrix-vector products alone.

`lanczos_extremes(hvp, start, rng, num_iters)` runs one Krylov sequence per matrix. The
matrices are given only through `hvp`, a function {entry: V [..., n]} -> {entry: S V}: every
entry of the dict holds one n x n matrix per index of its leading dims (a layer's neurons, or
layers x neurons), all advancing together as the rows of one array, and entries may differ in
n. Each sequence is fully re-orthogonalised, restarts with a random direction where it breaks
down (an invariant subspace was found), and ends in the smallest and the largest Ritz pair of
its tridiagonal matrix (the ends of the spectrum converge first, together), the smallest with
its residual |S v - theta v| from the recurrence rather than another product.
Everything runs in the dtype of the start vectors. See docs/method.md, "Lanczos".

No LAPACK: jaxlib's CPU eigh spreads a batch over the intra-op thread pool and blocks a pool
thread waiting for it, which can deadlock when called inside these loops. The tridiagonal step
(`tridiagonal_smallest_pair`, applied to T and to -T) is written in plain XLA ops instead.

Nothing here knows about networks: the caller supplies the products.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# {entry: V [..., n]} -> {entry: S V}, one n x n matrix per index of an entry's leading dims.
Products = Callable[[dict], dict]


class RitzPairs(NamedTuple):
  """What lanczos_extremes returns for one entry; [...] are the entry's leading dims."""
  eigvals: jax.Array         # [...] smallest Ritz value
  eigvecs: jax.Array         # [..., n] its unit Ritz vector
  residuals: jax.Array       # [...] |S v - theta v| of that pair
  start_rayleigh: jax.Array  # [...] v0^T S v0 of the unit start vector
  eigvals_max: jax.Array     # [...] largest Ritz value
  eigvecs_max: jax.Array     # [..., n] its unit Ritz vector


def random_unit_rows(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Normally distributed rows of `shape`, each scaled to unit norm along the last axis."""
  v = jax.random.normal(key, shape, dtype)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _rowdot(a, b):
  return jnp.sum(a * b, axis=-1)


def _orthogonalise(w, basis, count, passes: int = 1):
  """w [..., n] minus its projection on the first `count` rows of basis [k, ..., n] (one
  basis per index of the leading dims): classical Gram-Schmidt, `passes` times.

  The basis is the largest array here and passes over it are memory-bound, so each pass
  reads only the rows filled so far, twice (the coefficients, then the update), not the
  whole preallocated basis.
  """
  for _ in range(passes):
    coefficients = jax.lax.fori_loop(
        0, count, lambda k, c, w=w: c.at[k].set(_rowdot(w, basis[k])),
        jnp.zeros(basis.shape[:-1], w.dtype))
    w = jax.lax.fori_loop(0, count, lambda k, v, c=coefficients: v - c[k][..., None] * basis[k], w)
  return w


def _restart(nxt, broke, key, basis, count):
  """nxt with the rows of sequences that broke down replaced by fresh random directions,
  orthogonalised to the basis."""
  # A random vector lies mostly in the basis' span: twice is enough (and needed).
  fresh = _orthogonalise(random_unit_rows(key, nxt.shape, nxt.dtype), basis, count, passes=2)
  fresh = fresh / jnp.linalg.norm(fresh, axis=-1, keepdims=True)
  return jnp.where(broke[..., None], fresh, nxt)


def lanczos_extremes(hvp: Products, start: dict, rng: jax.Array, num_iters: int) -> dict:
  """Smallest and largest eigenpair of every matrix, given hvp: {p: V [..., n]} -> {p: S V}.

  start[p] [..., n]: unit start vectors, whose dtype every step of entry p keeps; rng draws
  the random vectors that continue a sequence where it breaks down. An entry with
  n < num_iters has a complete basis after n vectors; only those enter its Ritz values.
  Returns {p: RitzPairs}.
  """
  dims = {p: v.shape[-1] for p, v in start.items()}
  iters = {p: min(num_iters, n) for p, n in dims.items()}

  def body(i, carry):
    basis, alphas, betas = carry
    q = {p: basis[p][i] for p in basis}
    w = hvp(q)
    new_basis, new_alphas, new_betas = {}, {}, {}
    for entry, p in enumerate(basis):
      alpha = _rowdot(w[p], q[p])
      # The three-term recurrence removes the large components along q_i and q_{i-1}; one
      # pass against the whole basis then removes the rounding drift that would otherwise
      # make converged eigenvalues reappear. At i = 0 the index clamps to 0, where betas is
      # still all zeros; after a restart the beta is 0 too.
      previous = jnp.maximum(i - 1, 0)
      wp = w[p] - alpha[..., None] * q[p] - betas[p][previous][..., None] * basis[p][previous]
      norm_before = jnp.linalg.norm(wp, axis=-1)
      wp = _orthogonalise(wp, basis[p], i + 1)
      beta = jnp.linalg.norm(wp, axis=-1)
      # A second pass where the first removed most of some sequence's vector: what is left is
      # then mostly rounding and no longer orthogonal ("twice is enough", Daniel, Gragg,
      # Kaufman and Stewart's criterion).
      def second_pass(v, basis=basis[p]):
        v = _orthogonalise(v, basis, i + 1)
        return v, jnp.linalg.norm(v, axis=-1)
      wp, beta = jax.lax.cond(jnp.any(beta < 0.7 * norm_before), second_pass,
                              lambda v: (v, beta), wp)
      eps = jnp.finfo(wp.dtype).eps
      scale = jnp.maximum(jnp.max(jnp.abs(alphas[p]), axis=0), jnp.max(betas[p], axis=0))
      # Breakdown only at rounding level: a beta declared zero is dropped from the tridiagonal
      # matrix and moves its Ritz values by up to beta, so any larger threshold would cost
      # accuracy. Small genuine betas are safe to follow: such a vector is re-orthogonalised
      # twice.
      broke = beta <= 10 * eps * jnp.maximum(jnp.maximum(scale, jnp.abs(alpha)), eps)
      nxt = wp / jnp.where(broke, 1.0, beta)[..., None]
      # Restart vectors cost another pass over the basis: only when some sequence broke down.
      restart_key = jax.random.fold_in(jax.random.fold_in(rng, entry), i)
      nxt = jax.lax.cond(jnp.any(broke), _restart, lambda n, *_: n, nxt, broke, restart_key,
                         basis[p], i + 1)
      has_next = i + 1 < iters[p]
      new_basis[p] = basis[p].at[i + 1].set(jnp.where(has_next, nxt, 0.0))
      new_alphas[p] = alphas[p].at[i].set(alpha)
      # The last beta couples to nothing; it is kept for the residuals.
      new_betas[p] = betas[p].at[i].set(jnp.where(broke, 0.0, beta))
    return new_basis, new_alphas, new_betas

  # Row-major in the iteration: one Lanczos vector of all matrices is one contiguous row.
  basis = {p: jnp.zeros((num_iters + 1,) + v.shape, v.dtype).at[0].set(v) for p, v in start.items()}
  alphas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  betas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  basis, alphas, betas = jax.lax.fori_loop(0, num_iters, body, (basis, alphas, betas))

  out = {}
  for p in start:
    k = iters[p]
    a, b = jnp.moveaxis(alphas[p][:k], 0, -1), jnp.moveaxis(betas[p][:k - 1], 0, -1)
    ritz_vector = lambda y, p=p, k=k: jnp.einsum("...k,k...n->...n", y, basis[p][:k])
    theta, y = tridiagonal_smallest_pair(a, b)
    vec = ritz_vector(y)
    norm = jnp.linalg.norm(vec, axis=-1)
    # S Q = Q T + beta_k q_{k+1} e_k^T, so |S v - theta v| = |beta_k y_k| for v = Q y: the
    # residual without another product.
    residual = jnp.abs(betas[p][k - 1] * y[..., k - 1]) / norm
    # -T has the eigenvectors of T and its eigenvalues negated: its smallest is T's largest.
    neg_theta_max, y_max = tridiagonal_smallest_pair(-a, -b)
    vec_max = ritz_vector(y_max)
    out[p] = RitzPairs(theta, vec / norm[..., None], residual, alphas[p][0], -neg_theta_max,
                       vec_max / jnp.linalg.norm(vec_max, axis=-1, keepdims=True))
  return out


def tridiagonal_smallest_pair(a: jax.Array, b: jax.Array, points: int = 15):
  """Smallest eigenpair of symmetric tridiagonal matrices: diagonals a [..., k], off-diagonals
  b [..., k-1]; returns (eigenvalues [...], unit eigenvectors [..., k]).

  Multisection on Sturm counts (`points` shifts per step) brings the eigenvalue to rounding
  level of |T|, as LAPACK's bisection does; the eigenvector comes from the twisted
  factorisation of T - theta at its most singular index (as in MRRR), stable for an accurate
  theta. Breakdowns (zero b) decouple the matrix and are handled as such.
  """
  dtype = a.dtype
  eps = jnp.finfo(dtype).eps
  k = a.shape[-1]
  zero = jnp.zeros(a.shape[:-1] + (1,), dtype)
  b_before = jnp.concatenate([zero, b], axis=-1)  # b_{i-1}, 0 at i = 0
  b_after = jnp.concatenate([b, zero], axis=-1)   # b_i, 0 at i = k-1
  b2_before, b2_after = b_before ** 2, b_after ** 2
  radius = jnp.abs(b_before) + jnp.abs(b_after)
  scale = jnp.maximum(jnp.max(jnp.abs(a) + radius, axis=-1), jnp.finfo(dtype).tiny)
  # Pivots smaller than this are replaced by it (LAPACK's pivmin): no division by zero.
  pivmin = eps * eps * scale

  def guarded(q, floor):
    return jnp.where(jnp.abs(q) < floor, -floor, q)

  rows = lambda x: jnp.moveaxis(x, -1, 0)  # [k, ...]: scans run over the matrix index

  def count_below(shifts):  # [..., m] -> number of eigenvalues below each shift
    def step(carry, row):
      q, count = carry
      a_i, b2_i = row
      q = guarded((a_i[..., None] - shifts) - b2_i[..., None] / q, pivmin[..., None])
      return (q, count + (q < 0)), None
    init = (jnp.ones_like(shifts), jnp.zeros(shifts.shape, jnp.int32))
    return jax.lax.scan(step, init, (rows(a), rows(b2_before)))[0][1]

  def narrow(_, bounds):
    lo, hi = bounds
    x = lo[..., None] + (hi - lo)[..., None] * (jnp.arange(1, points + 1, dtype=dtype) / (points + 1))
    below = count_below(x) > 0
    return (jnp.maximum(lo, jnp.max(jnp.where(below, lo[..., None], x), axis=-1)),
            jnp.minimum(hi, jnp.min(jnp.where(below, x, hi[..., None]), axis=-1)))
  # Gershgorin's lower bound, and the smallest diagonal entry (a Rayleigh quotient) above.
  bounds = (jnp.min(a - radius, axis=-1), jnp.min(a, axis=-1))
  steps = int(np.ceil(-np.log2(eps) / np.log2(points + 1))) + 2
  lo, hi = jax.lax.fori_loop(0, steps, narrow, bounds)
  theta = 0.5 * (lo + hi)

  shifted = a - theta[..., None]
  def pivots(carry, row):
    s_i, b2_i = row
    d = guarded(s_i - b2_i / carry, pivmin)
    return d, d
  ones = jnp.ones(theta.shape, dtype)
  _, forward = jax.lax.scan(pivots, ones, (rows(shifted), rows(b2_before)))
  _, backward = jax.lax.scan(pivots, ones, (rows(shifted), rows(b2_after)), reverse=True)
  forward, backward = jnp.moveaxis(forward, 0, -1), jnp.moveaxis(backward, 0, -1)
  twist = jnp.argmin(jnp.abs(forward + backward - shifted), axis=-1)

  index = jnp.arange(k)
  def below_twist(z_before, row):  # i > r: z_i = -b_{i-1} / backward_i z_{i-1}
    i, b_i, d_i = row
    z = jnp.where(i == twist, 1.0, jnp.where(i > twist, -b_i / d_i * z_before, 0.0)).astype(dtype)
    return z, z
  _, z = jax.lax.scan(below_twist, jnp.zeros(theta.shape, dtype),
                      (index, rows(b_before), rows(backward)))
  def above_twist(z_after, row):  # i < r: z_i = -b_i / forward_i z_{i+1}
    i, b_i, d_i, z_i = row
    z_i = jnp.where(i < twist, -b_i / d_i * z_after, z_i)
    return z_i, z_i
  _, z = jax.lax.scan(above_twist, jnp.zeros(theta.shape, dtype),
                      (index, rows(b_after), rows(forward), z), reverse=True)
  z = jnp.moveaxis(z, 0, -1)
  # The sign that LAPACK would leave to chance, fixed: first component >= 0. For a Lanczos
  # matrix the Ritz vector then points along its start vector, and it does not flip where
  # rounding differs (another device layout) and moves the twist index.
  z = jnp.where(z[..., :1] < 0, -z, z)
  return theta, z / jnp.linalg.norm(z, axis=-1, keepdims=True)
