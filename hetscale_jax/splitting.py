"""Every neuron's splitting-matrix spectrum, matrix-free (DESIGN section 3).

For neuron j of a GrowableDense, with g = dL/dy_j, z = y_j (its current output) and
x~ = [x, 1] at every token of the probe batch,

    S_j = sum_tokens g s''(z) x~ x~^T.

Products S_j v_j for all neurons of all layers come from one forward-over-reverse product
(`jax.jvp` of `jax.grad`) of the loss in a zero-valued probe parameter D whose Hessian is
exactly block-diagonal (`layers.probe_branch`). Two forms give the same operator:

* "streamed": every product re-runs the network on the probe batch with the probe branch
  attached; memory is that of one training step, whatever the batch size.
* "collected": one pass collects each layer's x~, z and g; every product is then the
  layer-local jvp-over-grad of sum g * probe_branch(z, x~ D^T), which costs two matmuls per
  layer instead of a network pass. Holds all activations of the probe batch in memory.

A batched Lanczos (one Krylov sequence per neuron, all neurons of a layer in parallel, fully
re-orthogonalised) then yields each neuron's smallest eigenpair. With collected statistics the
layers run one after another, so only one layer's Krylov basis is ever held; streamed products
serve all layers at once, so all layers share one loop.

Layers are found by intercepting GrowableDense calls while the user's loss runs, so any
linen model built from GrowableDense works and the model itself knows nothing of this.
"""

from collections.abc import Callable, Sequence
import contextlib
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import layers

# A layer is named by its module path, "blocks_0/attn/qkv", as in the params tree.
LayerPath = str
LossFn = Callable[[Any, Any], jax.Array]


@flax.struct.dataclass
class Spectrum:
  """The smallest eigenpair of every neuron's splitting matrix in one layer."""
  eigvals: jax.Array      # [d_out]
  eigvecs: jax.Array      # [d_out, d_in + 1], unit norm
  residuals: jax.Array    # [d_out], |S v - lambda v|
  input_scale: jax.Array  # [], mean |x~|^2 over probe tokens: the layer's input scale
  start_dirs: jax.Array   # [d_out, d_in + 1], random unit vectors that started Lanczos
  start_rayleigh: jax.Array  # [d_out], r^T S r for r = start_dirs: the first-order score


def layer_path(module: nn.Module) -> LayerPath:
  return "/".join(module.path)


@contextlib.contextmanager
def _on_growable_outputs(hook: Callable[[nn.Module, jax.Array, jax.Array], jax.Array]):
  """Within the context, every GrowableDense output y becomes hook(module, x, y)."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, layers.GrowableDense):
      out = hook(context.module, args[0], out)
    return out
  with nn.intercept_methods(interceptor):
    yield


def _probe_dtype(y):
  return jnp.promote_types(y.dtype, jnp.float32)


def find_growable_layers(loss_fn: LossFn, variables, batch) -> dict[LayerPath, dict]:
  """{path: dict(d_in, d_out, out, activation)} of every GrowableDense the loss calls.

  Only traces the loss (jax.eval_shape); nothing is computed.
  """
  found = {}

  def record(module, x, y):
    path = layer_path(module)
    if path in found:
      raise ValueError(f"GrowableDense {path!r} is called more than once per loss evaluation; "
                       "the splitting spectrum needs one call per layer (no weight sharing).")
    found[path] = dict(d_in=x.shape[-1], d_out=y.shape[-1], out=jax.ShapeDtypeStruct(y.shape, y.dtype),
                       activation=module.unit_activation)
    return y

  with _on_growable_outputs(record):
    # A fresh function each time: eval_shape caches traces by function, and a cached trace
    # would skip the interceptor that records the layers.
    jax.eval_shape(lambda v, b: loss_fn(v, b), variables, batch)
  if not found:
    raise ValueError("the loss calls no GrowableDense layer: nothing to compute a spectrum for.")
  return found


def _as_batches(batch) -> list:
  """A probe is one batch or a list of batches whose splitting matrices are averaged.

  Only a list means several batches: a tuple is a common form of one batch.
  """
  return batch if isinstance(batch, list) else [batch]


def streamed_hvp(loss_fn: LossFn, variables, batch, activations: dict[LayerPath, str]):
  """V -> {path: S V} by jvp-over-grad of the loss in the probe parameters D (at D = 0)."""
  batches = _as_batches(batch)

  def loss_in_probe(probe):
    def attach(module, x, y):
      path = layer_path(module)
      dtype = _probe_dtype(y)
      x_tilde = jax.lax.stop_gradient(layers.with_bias_input(x.astype(dtype)))
      p = x_tilde @ probe[path].T
      return y + layers.probe_branch(y.astype(dtype), p, activations[path]).astype(y.dtype)
    with _on_growable_outputs(attach):
      return sum(loss_fn(variables, b) for b in batches) / len(batches)

  def hvp(vecs):
    zeros = jax.tree.map(jnp.zeros_like, vecs)
    return jax.jvp(jax.grad(loss_in_probe), (zeros,), (vecs,))[1]
  return hvp


def collect_layer_statistics(loss_fn: LossFn, variables, batch):
  """{path: (x~ [T, d_in+1], z [T, d_out], g [T, d_out])} over all probe tokens T.

  g = dL/dy comes from the gradient of a zero perturbation added to every layer output, so
  one forward and one backward pass collect every layer. Several batches are joined,
  each g scaled by 1/num_batches so that S is the average over batches.
  """
  batches = _as_batches(batch)
  per_batch = []
  for b in batches:
    def loss_with_perturbation(perturbation, b=b):
      seen = {}
      def capture(module, x, y):
        path = layer_path(module)
        dtype = _probe_dtype(y)
        seen[path] = (layers.with_bias_input(x.astype(dtype)), y.astype(dtype))
        return y + perturbation[path].astype(y.dtype)
      with _on_growable_outputs(capture):
        loss = loss_fn(variables, b)
      return loss, seen
    zeros = {p: jnp.zeros(s["out"].shape, _probe_dtype(s["out"]))
             for p, s in find_growable_layers(loss_fn, variables, b).items()}
    grads, seen = jax.grad(loss_with_perturbation, has_aux=True)(zeros)
    per_batch.append({p: (x, z, grads[p].astype(z.dtype) / len(batches)) for p, (x, z) in seen.items()})

  def flat(a):
    return a.reshape(-1, a.shape[-1])

  def join(arrays):
    if len({a.shape for a in arrays}) > 1:  # batches of different sizes
      return jnp.concatenate(arrays)
    # Token order does not matter (S sums over tokens). Stacked behind the token axis, which
    # leads with the examples, batches stay split over a mesh's data axis; concatenated
    # along it, they were gathered onto every device.
    return jnp.stack(arrays, axis=1).reshape(-1, arrays[0].shape[-1])
  return {p: tuple(join([flat(stats[p][i]) for stats in per_batch]) for i in range(3))
          for p in per_batch[0]}


def input_scales(loss_fn: LossFn, variables, batch) -> dict[LayerPath, jax.Array]:
  """{path: mean |x~|^2 over all probe tokens}: each layer's input scale, forward pass only."""
  batches = _as_batches(batch)
  totals = []
  for b in batches:
    seen = {}
    def measure(module, x, y, seen=seen):
      x_tilde = layers.with_bias_input(x.astype(_probe_dtype(y)))
      seen[layer_path(module)] = jnp.mean(jnp.sum(x_tilde ** 2, axis=-1))
      return y
    with _on_growable_outputs(measure):
      loss_fn(variables, b)
    totals.append(seen)
  return {p: sum(t[p] for t in totals) / len(totals) for p in totals[0]}


def local_probe_gradient(x_tilde, z, g, probe, activation: str):
  """d/dD of one layer's probe branch sum g * probe(z, x~ D^T); its jvp in D is S V."""
  def local_loss(d):
    return jnp.sum(g * layers.probe_branch(z, x_tilde @ d.T, activation))
  return jax.grad(local_loss)(probe)


def group_layers(shapes: dict[LayerPath, tuple]) -> dict[tuple, list[LayerPath]]:
  """Layers sharing a key (e.g. (d_out, d_in, activation)), so one batched op serves them all:
  the qkv layers of every block of a uniform DeiT form one group."""
  groups = {}
  for path in sorted(shapes):
    groups.setdefault(shapes[path], []).append(path)
  return groups


def stack_groups(tree: dict[LayerPath, Any], groups) -> dict[tuple, Any]:
  return {key: jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[p] for p in paths])
          for key, paths in groups.items()}


def unstack_groups(tree: dict[tuple, Any], groups) -> dict[LayerPath, Any]:
  return {p: jax.tree.map(lambda x, i=i: x[i], tree[key])
          for key, paths in groups.items() for i, p in enumerate(paths)}


def layer_hvp(x_tilde, z, g, activation: str):
  """V [d_out, d_in+1] -> S V for one layer from its collected statistics: the jvp in D of
  local_probe_gradient, taken once with jax.linearize (a plain jvp would also recompute the
  primal gradient at D = 0 in every product, doubling its matmuls)."""
  gradient = functools.partial(local_probe_gradient, x_tilde, z, g, activation=activation)
  zeros = jnp.zeros(z.shape[-1:] + x_tilde.shape[-1:], x_tilde.dtype)
  return jax.linearize(gradient, zeros)[1]


def collected_hvp(stats, activations: dict[LayerPath, str]):
  """V -> {path: S V} for all layers from collected statistics (layer_hvp of each)."""
  products = {p: layer_hvp(*stats[p], activations[p]) for p in stats}
  return lambda vecs: {p: products[p](v) for p, v in vecs.items()}


def _rowdot(a, b):
  return jnp.sum(a * b, axis=-1)


def _orthogonalise(w, basis, count, passes: int = 1):
  """w [..., n] minus its projection on the first `count` rows of basis [k, ..., n] (one
  basis per neuron): classical Gram-Schmidt, `passes` times.

  The basis is the largest array of the spectrum and memory-bound passes over it cost more
  than the products at small probes, so each pass reads the rows filled so far, twice (the
  coefficients, then the update), not the whole preallocated basis.
  """
  for _ in range(passes):
    coefficients = jax.lax.fori_loop(
        0, count, lambda k, c, w=w: c.at[k].set(_rowdot(w, basis[k])),
        jnp.zeros(basis.shape[:-1], w.dtype))
    w = jax.lax.fori_loop(0, count, lambda k, v, c=coefficients: v - c[k][..., None] * basis[k], w)
  return w


def _restart(nxt, broke, key, basis, count):
  """nxt with the rows of neurons that broke down replaced by fresh random directions,
  orthogonalised."""
  # A random vector lies mostly in the basis' span: twice is enough (and needed).
  fresh = _orthogonalise(_random_unit_rows(key, nxt.shape, nxt.dtype), basis, count, passes=2)
  fresh = fresh / jnp.linalg.norm(fresh, axis=-1, keepdims=True)
  return jnp.where(broke[..., None], fresh, nxt)


def lanczos_smallest(hvp, start: dict, rng: jax.Array, num_iters: int):
  """Smallest eigenpair of every neuron's matrix, given hvp: {p: V [..., n]} -> {p: S V}.

  Every entry p holds one n x n matrix per index of its leading dims (neurons, or layers x
  neurons). start[p] [..., n]: unit start vectors; rng draws the random vectors that continue
  a sequence where it breaks down (an invariant subspace was found).
  An entry with n < num_iters has a complete basis after n vectors; only those enter its
  Ritz values. Returns {p: (eigvals [...], eigvecs [..., n], residuals [...], start
  Rayleigh quotients [...])}.
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
      # A second pass where the first removed most of some neuron's vector: what is left is
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
      # matrix and moves its Ritz values by up to beta, so the former sqrt(eps) threshold
      # allowed errors up to sqrt(eps) |S| (seen: 3e-9 |S| in float64 with a full basis).
      # Small genuine betas are safe to follow: such a vector is re-orthogonalised twice.
      broke = beta <= 10 * eps * jnp.maximum(jnp.maximum(scale, jnp.abs(alpha)), eps)
      nxt = wp / jnp.where(broke, 1.0, beta)[..., None]
      # Restart vectors cost another pass over the basis: only when some neuron broke down.
      restart_key = jax.random.fold_in(jax.random.fold_in(rng, entry), i)
      nxt = jax.lax.cond(jnp.any(broke), _restart, lambda n, *_: n, nxt, broke, restart_key,
                         basis[p], i + 1)
      has_next = i + 1 < iters[p]
      new_basis[p] = basis[p].at[i + 1].set(jnp.where(has_next, nxt, 0.0))
      new_alphas[p] = alphas[p].at[i].set(alpha)
      # The last beta couples to nothing; it is kept for the residuals.
      new_betas[p] = betas[p].at[i].set(jnp.where(broke, 0.0, beta))
    return new_basis, new_alphas, new_betas

  # Row-major in the iteration: one Lanczos vector of all neurons is one contiguous row.
  basis = {p: jnp.zeros((num_iters + 1,) + v.shape, v.dtype).at[0].set(v) for p, v in start.items()}
  alphas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  betas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  basis, alphas, betas = jax.lax.fori_loop(0, num_iters, body, (basis, alphas, betas))

  out = {}
  for p in start:
    k = iters[p]
    theta, y = _tridiagonal_smallest_pair(jnp.moveaxis(alphas[p][:k], 0, -1),
                                          jnp.moveaxis(betas[p][:k - 1], 0, -1))
    vec = jnp.einsum("...k,k...n->...n", y, basis[p][:k])
    norm = jnp.linalg.norm(vec, axis=-1)
    # S Q = Q T + beta_k q_{k+1} e_k^T, so |S v - theta v| = |beta_k y_k| for v = Q y: the
    # residual without another product (tests check it against the explicit one).
    residual = jnp.abs(betas[p][k - 1] * y[..., k - 1]) / norm
    out[p] = (theta, vec / norm[..., None], residual, alphas[p][0])
  return out


def _tridiagonal_smallest_pair(a, b, points: int = 15):
  """Smallest eigenpair of symmetric tridiagonal matrices: diagonals a [..., k], off-diagonals
  b [..., k-1]; returns (eigenvalues [...], unit eigenvectors [..., k]).

  Plain XLA ops, no LAPACK: jaxlib's CPU eigh spreads a batch over the intra-op thread pool
  and blocks a pool thread waiting for it, which deadlocked inside the Lanczos loops (seen on
  2 cores). Multisection on Sturm counts (`points` shifts per step) brings the eigenvalue to
  rounding level of |T|, as LAPACK's bisection does; the eigenvector comes from the twisted
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


def _random_unit_rows(key, shape, dtype):
  v = jax.random.normal(key, shape, dtype)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


METHODS = ("collected", "streamed")


def _collected_pairs(stats, groups, start, restart_keys, num_iters):
  """Lanczos one layer at a time from collected statistics: {path: (eigvals, eigvecs,
  residuals, start Rayleigh quotients)}.

  The products of a layer need only its own statistics, so the layers need not share a
  Krylov sequence: each runs alone and only one layer's basis exists at any time (all layers'
  bases at once were the spectrum's largest array). lax.map over each group of same-shaped
  layers keeps the compiled program as small as one layer's.
  """
  pairs, previous = {}, None
  for key, paths in groups.items():
    inputs = (jnp.arange(len(paths)), jnp.stack([start[p] for p in paths]),
              jnp.stack([restart_keys[p] for p in paths]))
    if previous is not None:
      # Group after group: XLA may otherwise run them side by side, each with its basis.
      previous, inputs = jax.lax.optimization_barrier((previous, inputs))

    def one_layer(layer, activation=key[2], paths=paths):
      index, v, rng = layer
      # The layer's statistics picked by index: stacked for lax.map, the whole probe's
      # statistics would be held a second time.
      x_tilde, z, g = jax.lax.switch(index, [lambda p=p: stats[p] for p in paths])
      product = layer_hvp(x_tilde, z, g, activation)  # linearised once, outside the loop
      return lanczos_smallest(lambda q: {"": product(q[""])}, {"": v}, rng, num_iters)[""]
    previous = jax.lax.map(one_layer, inputs)
    pairs.update({p: jax.tree.map(lambda a, i=i: a[i], previous) for i, p in enumerate(paths)})
  return pairs


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters", "method"))
def _spectrum(loss_fn, variables, batch, rng, num_iters, method):
  # The layers of the first batch: loss_fn takes one batch, never the list.
  shapes = find_growable_layers(loss_fn, variables, _as_batches(batch)[0])
  dtype = jnp.promote_types(jax.tree.leaves(variables["params"])[0].dtype, jnp.float32)
  rng, restart_rng = jax.random.split(rng)
  start, restart_keys = {}, {}
  for i, (p, s) in enumerate(sorted(shapes.items())):
    k1, restart_keys[p] = jax.random.split(jax.random.fold_in(rng, i))
    start[p] = _random_unit_rows(k1, (s["d_out"], s["d_in"] + 1), dtype)
  # Same-shaped layers (the qkv of every block of a uniform DeiT) form one group that one set
  # of ops serves: far less to compile for deep models.
  groups = group_layers({p: (s["d_out"], s["d_in"], s["activation"]) for p, s in shapes.items()})
  if method == "collected":
    pairs = _collected_pairs(collect_layer_statistics(loss_fn, variables, batch), groups, start,
                             restart_keys, num_iters)
  else:
    # Every streamed product re-runs the network for all layers: one sequence for them all.
    hvp = streamed_hvp(loss_fn, variables, batch, {p: s["activation"] for p, s in shapes.items()})
    pairs = unstack_groups(lanczos_smallest(
        lambda vecs: stack_groups(hvp(unstack_groups(vecs, groups)), groups),
        stack_groups(start, groups), restart_rng, num_iters), groups)
  scales = input_scales(loss_fn, variables, batch)
  return {p: Spectrum(eigvals=lam, eigvecs=v, residuals=res, input_scale=scales[p],
                      start_dirs=start[p], start_rayleigh=rayleigh)
          for p, (lam, v, res, rayleigh) in pairs.items()}


# Chosen for what growth uses. The neurons an event picks have the most negative eigenvalues,
# which Lanczos finds first: at 12 iterations the picks equal those from dense eigh, and their
# eigenvalues agree to float32 rounding (max 5.8e-7 relative), on DeiT-Ti widths at init
# (tests/test_splitting.py) and at all three growth events of the default config's training.
# What converges last are eigenvalues near zero, which are never picked (DeiT-Ti widths: p90
# relative error 1e-3 at 12, 5e-6 at 16; see BENCHMARKS.md). 12 products cost about 8
# train-step gradients at DeiT-S widths; growth.num_iters trades the two per run.
DEFAULT_NUM_ITERS = 12


def splitting_spectrum(loss_fn: LossFn, variables, batch, *, num_iters: int = DEFAULT_NUM_ITERS,
                       rng: jax.Array | None = None, method: str = "collected"
                       ) -> dict[LayerPath, Spectrum]:
  """Smallest eigenpair of the splitting matrix of every neuron of every GrowableDense.

  loss_fn(variables, batch) -> scalar must be deterministic (no dropout, drop-path or
  augmentation noise): every Lanczos step must see the same operator. `batch` may be a
  list of batches; their splitting matrices are averaged. `method` is "collected"
  (fast, holds the probe's activations) or "streamed" (memory of one training step).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: choose one of {METHODS}")
  if num_iters < 1:
    raise ValueError(f"num_iters={num_iters}: must be >= 1")
  rng = jax.random.key(0) if rng is None else rng
  return _spectrum(loss_fn, variables, batch, rng, num_iters, method)
