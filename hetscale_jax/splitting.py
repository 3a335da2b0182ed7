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

A batched Lanczos (one Krylov sequence per neuron, all neurons of all layers in parallel,
fully re-orthogonalised) then yields each neuron's smallest eigenpair.

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


def collected_hvp(stats, activations: dict[LayerPath, str]):
  """V -> {path: S V} from collected statistics: jvp-over-grad of the layer-local probe
  branches, vmapped over each group of same-shaped layers.

  The jvp is taken once with jax.linearize, outside the Lanczos loop: a plain jvp would also
  recompute the primal gradient at D = 0 in every product, which doubled its matmuls.
  """
  groups = group_layers({p: (x.shape, z.shape, activations[p]) for p, (x, z, _) in stats.items()})
  stacked = stack_groups(stats, groups)
  linear = {}
  for key, (x_tilde, z, g) in stacked.items():
    gradient = functools.partial(jax.vmap(functools.partial(local_probe_gradient,
                                                            activation=key[2])), x_tilde, z, g)
    zeros = jnp.zeros(z.shape[:1] + z.shape[-1:] + x_tilde.shape[-1:], x_tilde.dtype)
    linear[key] = jax.linearize(gradient, zeros)[1]

  def hvp(vecs):
    products = {key: linear[key](stack_groups(vecs, {key: paths})[key])
                for key, paths in groups.items()}
    return unstack_groups(products, groups)
  return hvp


def _rowdot(a, b):
  return jnp.sum(a * b, axis=-1)


def _orthogonalise(w, basis):
  """w [..., n] minus its projection on basis [..., k, n] (one basis per neuron), done twice
  for numerical orthogonality (classical Gram-Schmidt, twice is enough).

  The basis is the largest array of the spectrum and each pass only streams through it, so
  the products are written as elementwise products and sums, which XLA fuses into loops that
  read it once at memory speed; as einsums they became one tiny matrix-vector product per
  neuron, 2x slower on CPU (and the basis is neuron-major so that neither needs a transpose).
  """
  for _ in range(2):
    coefficients = jnp.sum(basis * w[..., None, :], axis=-1)
    w = w - jnp.sum(coefficients[..., None] * basis, axis=-2)
  return w


def _restart(nxt, broke, restart, basis):
  """nxt with the rows of neurons that broke down replaced by restart, orthogonalised."""
  fresh = _orthogonalise(restart, basis)
  fresh = fresh / jnp.linalg.norm(fresh, axis=-1, keepdims=True)
  return jnp.where(broke[..., None], fresh, nxt)


def lanczos_smallest(hvp, start: dict, restarts: dict, num_iters: int):
  """Smallest eigenpair of every neuron's matrix, given hvp: {p: V [..., n]} -> {p: S V}.

  Every entry p holds one n x n matrix per index of its leading dims (neurons, or layers x
  neurons). start[p] [..., n]: unit start vectors; restarts[p] [num_iters, ..., n]: random
  vectors that continue the sequence where it breaks down (an invariant subspace was found).
  An entry with n < num_iters has a complete basis after n vectors; only those enter its
  Ritz values. Returns {p: (eigvals [...], eigvecs [..., n], residuals [...], start
  Rayleigh quotients [...])}.
  """
  dims = {p: v.shape[-1] for p, v in start.items()}
  iters = {p: min(num_iters, n) for p, n in dims.items()}

  def body(i, carry):
    basis, alphas, betas = carry
    q = {p: basis[p][..., i, :] for p in basis}
    w = hvp(q)
    new_basis, new_alphas, new_betas = {}, {}, {}
    for p in basis:
      alpha = _rowdot(w[p], q[p])
      wp = _orthogonalise(w[p], basis[p])
      beta = jnp.linalg.norm(wp, axis=-1)
      eps = jnp.finfo(wp.dtype).eps
      scale = jnp.maximum(jnp.max(jnp.abs(alphas[p]), axis=0), jnp.max(betas[p], axis=0))
      # Breakdown only at rounding level: a beta declared zero is dropped from the tridiagonal
      # matrix and moves its Ritz values by up to beta, so the former sqrt(eps) threshold
      # allowed errors up to sqrt(eps) |S| (seen: 3e-9 |S| in float64 with a full basis).
      # Small genuine betas are safe to follow: the next vector is re-orthogonalised twice.
      broke = beta <= 10 * eps * jnp.maximum(jnp.maximum(scale, jnp.abs(alpha)), eps)
      nxt = wp / jnp.where(broke, 1.0, beta)[..., None]
      # Restart vectors cost another pass over the basis: only when some neuron broke down.
      nxt = jax.lax.cond(jnp.any(broke), _restart, lambda n, *_: n, nxt, broke, restarts[p][i],
                         basis[p])
      has_next = i + 1 < iters[p]
      new_basis[p] = basis[p].at[..., i + 1, :].set(jnp.where(has_next, nxt, 0.0))
      new_alphas[p] = alphas[p].at[i].set(alpha)
      new_betas[p] = betas[p].at[i].set(jnp.where(broke | ~has_next, 0.0, beta))
    return new_basis, new_alphas, new_betas

  basis = {p: jnp.zeros(v.shape[:-1] + (num_iters + 1, v.shape[-1]), v.dtype).at[..., 0, :].set(v)
           for p, v in start.items()}
  alphas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  betas = {p: jnp.zeros((num_iters,) + v.shape[:-1], v.dtype) for p, v in start.items()}
  basis, alphas, betas = jax.lax.fori_loop(0, num_iters, body, (basis, alphas, betas))

  theta, y = _smallest_ritz_pairs(alphas, betas, iters, num_iters)
  ritz = {}
  for p in start:
    vec = jnp.einsum("...k,...kn->...n", y[p], basis[p][..., :num_iters, :])
    ritz[p] = (theta[p], vec / jnp.linalg.norm(vec, axis=-1, keepdims=True))
  sv = hvp({p: v for p, (_, v) in ritz.items()})
  return {p: (lam, v, jnp.linalg.norm(sv[p] - lam[..., None] * v, axis=-1), alphas[p][0])
          for p, (lam, v) in ritz.items()}


def _smallest_ritz_pairs(alphas, betas, iters, num_iters):
  """Smallest eigenpair of every neuron's Lanczos tridiagonal matrix, in ONE batched eigh.

  One call on purpose: jaxlib's CPU eigh spreads its batch over the intra-op thread pool and
  waits for it, and two such calls running side by side (one per layer) deadlocked on a
  2-core machine. A layer with fewer iterations than num_iters is padded with a decoupled
  diagonal above its spectrum, which never yields the smallest pair and gets weight 0.
  """
  tris = []
  for p in alphas:
    k = iters[p]
    a = jnp.moveaxis(alphas[p], 0, -1).reshape(-1, num_iters)  # [neurons, num_iters]
    b = jnp.moveaxis(betas[p], 0, -1).reshape(-1, num_iters)[:, :-1]
    b = jnp.where(jnp.arange(num_iters - 1) < k - 1, b, 0.0)
    pad = 2 * jnp.max(jnp.abs(a[:, :k]), axis=1, keepdims=True) + 2 * jnp.max(b, initial=0.0) + 1
    a = jnp.where(jnp.arange(num_iters) < k, a, pad)
    tri = jnp.vectorize(jnp.diag, signature="(k)->(k,k)")(a)
    off = jnp.vectorize(lambda x: jnp.diag(x, 1), signature="(j)->(k,k)")(b)
    tris.append(tri + off + jnp.swapaxes(off, -1, -2))
  theta, y = jnp.linalg.eigh(jnp.concatenate(tris))
  sizes = np.cumsum([t.shape[0] for t in tris])[:-1]
  shapes = {p: alphas[p].shape[1:] for p in alphas}
  return ({p: t[:, 0].reshape(shapes[p]) for p, t in zip(alphas, jnp.split(theta, sizes))},
          {p: v[:, :, 0].reshape(shapes[p] + (num_iters,))
           for p, v in zip(alphas, jnp.split(y, sizes))})


def _random_unit_rows(key, shape, dtype):
  v = jax.random.normal(key, shape, dtype)
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


METHODS = ("collected", "streamed")


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters", "method"))
def _spectrum(loss_fn, variables, batch, rng, num_iters, method):
  # The layers of the first batch: loss_fn takes one batch, never the list.
  shapes = find_growable_layers(loss_fn, variables, _as_batches(batch)[0])
  activations = {p: s["activation"] for p, s in shapes.items()}
  dtype = jnp.promote_types(jax.tree.leaves(variables["params"])[0].dtype, jnp.float32)
  if method == "collected":
    hvp = collected_hvp(collect_layer_statistics(loss_fn, variables, batch), activations)
  else:
    hvp = streamed_hvp(loss_fn, variables, batch, activations)
  start, restarts = {}, {}
  for i, (p, s) in enumerate(sorted(shapes.items())):
    k1, k2 = jax.random.split(jax.random.fold_in(rng, i))
    start[p] = _random_unit_rows(k1, (s["d_out"], s["d_in"] + 1), dtype)
    restarts[p] = _random_unit_rows(k2, (num_iters, s["d_out"], s["d_in"] + 1), dtype)
  # Lanczos runs on groups of same-shaped layers: far fewer ops to compile for deep models.
  groups = group_layers({p: (s["d_out"], s["d_in"], s["activation"]) for p, s in shapes.items()})
  restart_groups = {key: jnp.stack([restarts[p] for p in paths], axis=1)
                    for key, paths in groups.items()}
  pairs = unstack_groups(lanczos_smallest(
      lambda vecs: stack_groups(hvp(unstack_groups(vecs, groups)), groups),
      stack_groups(start, groups), restart_groups, num_iters), groups)
  scales = input_scales(loss_fn, variables, batch)
  return {p: Spectrum(eigvals=lam, eigvecs=v, residuals=res, input_scale=scales[p],
                      start_dirs=start[p], start_rayleigh=rayleigh)
          for p, (lam, v, res, rayleigh) in pairs.items()}


# Smallest-eigenvalue error against dense eigh (float32, DeiT-Ti widths at init, 16 neurons per
# layer), median / 90th percentile of |dlambda|/|lambda|: 136 probe tokens 2.8e-7 / 2.4e-6 at 24
# iterations (3.7e-6 at 20, 2.4e-4 at 16, 6.3e-3 at 12); 4,160 tokens 3.4e-7 / 1.6e-6. Extreme
# eigenvalues, the ones selection needs, converge first. At 20 one neuron in 64 still stood at
# 1.3e-4 |S_j|; 24 bring all to 4e-6 |S_j| (tests/test_splitting.py), for 25 products (32
# took 33: each about one train-step gradient).
DEFAULT_NUM_ITERS = 24


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
