"""Every neuron's splitting-matrix spectrum, matrix-free (docs/method.md, "The splitting matrix").

For neuron j of a GrowableDense, with g = dL/dy_j, z = y_j (its current output) and
x~ = [x, 1] at every token of the probe batch,

    S_j = sum_tokens g s''(z) x~ x~^T.

Products S_j v_j for all neurons of all layers come from one forward-over-reverse product
(`jax.jvp` of `jax.grad`) of the loss in a zero-valued probe parameter D whose Hessian is
exactly block-diagonal (`layers.probe_branch`; docs/method.md, "The probe branch"). Two forms
give the same operator:

* "streamed": every product re-runs the network on the probe batch with the probe branch
  attached; memory is that of one training step, whatever the batch size.
* "collected": one pass collects each layer's x~, z and g; every product is then the
  layer-local jvp-over-grad of sum g * probe_branch(z, x~ D^T), which costs two matmuls per
  layer instead of a network pass. Holds all activations of the probe batch in memory.

The batched Lanczos of `hetscale_jax.lanczos` then yields each neuron's smallest and largest
eigenpair, in the dtype of the layer's statistics (at least float32, whatever the parameters' dtype). With
collected statistics the layers run one after another, so only one layer's Krylov basis is ever
held; streamed products serve all layers at once, so all layers share one loop.

Layers are found by intercepting GrowableDense calls while the user's loss runs, so any
linen model built from GrowableDense works and the model itself knows nothing of this. A
layer filter restricts all of it to the layers it keeps: the others get no statistics, no
probe branch and no Lanczos.

Beside the curvature, each neuron's first-order statistic G_j = sum_tokens g_j x~ (the gradient
of its weights and bias, for a layer without units) serves the first-order scores.
"""

from collections.abc import Callable
import contextlib
import functools
import hashlib
from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import layers
from hetscale_jax.lanczos import lanczos_extremes, random_unit_rows

# A layer is named by its module path, "blocks_0/attn/qkv", as in the params tree.
LayerPath = str
LossFn = Callable[[Any, Any], jax.Array]
# Whether a layer's spectrum is computed; None computes every layer's.
LayerFilter = Callable[[LayerPath], bool] | None


@flax.struct.dataclass
class Spectrum:
  """Every neuron's splitting-matrix extremes and first-order gradient in one layer."""
  eigvals: jax.Array      # [d_out], smallest eigenvalue
  eigvecs: jax.Array      # [d_out, d_in + 1], its unit eigenvector
  residuals: jax.Array    # [d_out], |S v - lambda v|
  eigvals_max: jax.Array  # [d_out], largest eigenvalue
  eigvecs_max: jax.Array  # [d_out, d_in + 1], its unit eigenvector
  input_scale: jax.Array  # [], mean |x~|^2 over probe tokens: the layer's input scale
  start_dirs: jax.Array   # [d_out, d_in + 1], random unit vectors that started Lanczos
  start_rayleigh: jax.Array  # [d_out], r^T S r for r = start_dirs: the first-order score
  gradient: jax.Array     # [d_out, d_in + 1], G_j = sum_tokens dL/dy_j x~ over the probe
  activation: str = flax.struct.field(pytree_node=False, default="gelu")  # the units' s


def random_spectrum(variables, seed: int = 0, layer_filter: LayerFilter = None,
                    dtype=np.float32) -> dict[LayerPath, Spectrum]:
  """A Spectrum of random values, of the right shapes for every dense layer of `variables`
  (2-d kernel, "head" aside) that layer_filter keeps: what benchmarks of compute or compile
  time and tests of the plumbing need, with no loss to evaluate."""
  rng = np.random.default_rng(seed)

  def unit_rows(shape):
    v = rng.normal(size=shape).astype(dtype)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)

  out = {}
  for key, kernel in sorted(traverse_util.flatten_dict(variables["params"], sep="/").items()):
    path = key.rsplit("/", 1)[0]
    if (not key.endswith("/kernel") or np.ndim(kernel) != 2 or path == "head"
        or not _keeps(layer_filter, path)):
      continue
    d_in, d_out = np.shape(kernel)
    low, high = np.sort(rng.normal(size=(2, d_out)).astype(dtype), axis=0)
    out[path] = Spectrum(
        eigvals=low, eigvecs=unit_rows((d_out, d_in + 1)), residuals=np.zeros(d_out, dtype),
        eigvals_max=high, eigvecs_max=unit_rows((d_out, d_in + 1)), input_scale=dtype(1.0),
        start_dirs=unit_rows((d_out, d_in + 1)), start_rayleigh=rng.normal(size=d_out).astype(dtype),
        gradient=rng.normal(size=(d_out, d_in + 1)).astype(dtype))
  return out


def layer_path(module: nn.Module) -> LayerPath:
  return "/".join(module.path)


def _keeps(layer_filter: LayerFilter, path: LayerPath) -> bool:
  return layer_filter is None or bool(layer_filter(path))


@contextlib.contextmanager
def _on_growable_outputs(hook: Callable[[nn.Module, jax.Array, jax.Array], jax.Array],
                         layer_filter: LayerFilter = None):
  """Within the context, the output y of every GrowableDense that layer_filter keeps becomes
  hook(module, x, y); the other layers run untouched."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, layers.GrowableDense)
        and _keeps(layer_filter, layer_path(module))):
      out = hook(module, args[0], out)
    return out
  with nn.intercept_methods(interceptor):
    yield


def statistics_dtype(y) -> jnp.dtype:
  """The dtype of a layer's statistics, probe branch and Lanczos solve, given its output y:
  y's own, at least float32 (bfloat16 rounding would swamp the sums over tokens and the
  orthogonality of the Krylov basis)."""
  return jnp.promote_types(y.dtype, jnp.float32)


def _recorded_trace(loss_fn: LossFn, variables, batch):
  """(the loss's jaxpr on one batch, {path: dict(d_in, d_out, out, activation)} of every
  GrowableDense it calls, in the order it calls them)."""
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
    # A fresh function each time: traces are cached by function, and a cached trace would
    # skip the interceptor that records the layers.
    jaxpr = jax.make_jaxpr(lambda v, b: loss_fn(v, b))(variables, batch)
  if not found:
    raise ValueError("the loss calls no GrowableDense layer: nothing to compute a spectrum for.")
  return jaxpr, found


def find_growable_layers(loss_fn: LossFn, variables, batch) -> dict[LayerPath, dict]:
  """{path: dict(d_in, d_out, out, activation)} of every GrowableDense the loss calls.

  Only traces the loss; nothing is computed.
  """
  return _recorded_trace(loss_fn, variables, batch)[1]


def _as_batches(batch) -> list:
  """A probe is one batch or a list of batches whose splitting matrices are averaged.

  Only a list means several batches: a tuple is a common form of one batch.
  """
  return batch if isinstance(batch, list) else [batch]


def streamed_hvp(loss_fn: LossFn, variables, batch, activations: dict[LayerPath, str]):
  """V -> {path: S V} by jvp-over-grad of the loss in the probe parameters D (at D = 0).

  Only the layers in `activations` get a probe branch; V[path] must be in
  statistics_dtype of the layer's output, the dtype the branch computes in.
  """
  batches = _as_batches(batch)

  def loss_in_probe(probe):
    def attach(module, x, y):
      path = layer_path(module)
      dtype = statistics_dtype(y)
      x_tilde = jax.lax.stop_gradient(layers.with_bias_input(x.astype(dtype)))
      p = x_tilde @ probe[path].T
      return y + layers.probe_branch(y.astype(dtype), p, activations[path]).astype(y.dtype)
    with _on_growable_outputs(attach, lambda path: path in activations):
      return sum(loss_fn(variables, b) for b in batches) / len(batches)

  def hvp(vecs):
    zeros = jax.tree.map(jnp.zeros_like, vecs)
    return jax.jvp(jax.grad(loss_in_probe), (zeros,), (vecs,))[1]
  return hvp


def collect_layer_statistics(loss_fn: LossFn, variables, batch, layer_filter: LayerFilter = None):
  """{path: (x~ [T, d_in+1], z [T, d_out], g [T, d_out])} over all probe tokens T, for the
  layers layer_filter keeps (None: all), in statistics_dtype of each layer's output.

  g = dL/dy comes from the gradient of a zero perturbation added to every kept layer's
  output, so one forward and one backward pass collect every layer; the others are neither
  captured nor perturbed. Several batches are joined, each g scaled by 1/num_batches so that
  S is the average over batches.
  """
  batches = _as_batches(batch)

  def flat(a):
    return a.reshape(-1, a.shape[-1])

  def one_batch(b):
    def loss_with_perturbation(perturbation):
      seen = {}
      def capture(module, x, y):
        path = layer_path(module)
        dtype = statistics_dtype(y)
        seen[path] = (layers.with_bias_input(x.astype(dtype)), y.astype(dtype))
        return y + perturbation[path].astype(y.dtype)
      with _on_growable_outputs(capture, layer_filter):
        loss = loss_fn(variables, b)
      return loss, seen
    zeros = {p: jnp.zeros(s["out"].shape, statistics_dtype(s["out"]))
             for p, s in find_growable_layers(loss_fn, variables, b).items()
             if _keeps(layer_filter, p)}
    grads, seen = jax.grad(loss_with_perturbation, has_aux=True)(zeros)
    return {p: (flat(x), flat(z), flat(grads[p].astype(z.dtype)) / len(batches))
            for p, (x, z) in seen.items()}

  shapes = {(jax.tree.structure(b), tuple(np.shape(leaf) for leaf in jax.tree.leaves(b)))
            for b in batches}
  if len(batches) > 1 and len(shapes) == 1:
    # One program body for all batches, applied in turn (compiling each batch's passes anew
    # multiplies the program); token order does not matter (S sums over tokens). Stacked
    # behind the token axis, which leads with the examples, batches stay split over a mesh's
    # data axis; concatenated along it, they were gathered onto every device.
    stacked = jax.lax.map(one_batch, jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches))
    return {p: tuple(jnp.moveaxis(a, 0, 1).reshape(-1, a.shape[-1]) for a in arrays)
            for p, arrays in stacked.items()}
  per_batch = [one_batch(b) for b in batches]  # one batch, or batches of different sizes
  return {p: tuple(jnp.concatenate([stats[p][i] for stats in per_batch]) for i in range(3))
          for p in per_batch[0]}


def input_scale(x_tilde) -> jax.Array:
  """mean |x~|^2 over the tokens of x~ [..., d_in + 1]: a layer's input scale."""
  return jnp.mean(jnp.sum(x_tilde ** 2, axis=-1))


def input_scales(loss_fn: LossFn, variables, batch,
                 layer_filter: LayerFilter = None) -> dict[LayerPath, jax.Array]:
  """{path: mean |x~|^2 over all probe tokens}: the input scale of each layer layer_filter
  keeps (None: all), forward pass only."""
  batches = _as_batches(batch)
  totals = []
  for b in batches:
    seen = {}
    def measure(module, x, y, seen=seen):
      seen[layer_path(module)] = input_scale(layers.with_bias_input(x.astype(statistics_dtype(y))))
      return y
    with _on_growable_outputs(measure, layer_filter):
      loss_fn(variables, b)
    totals.append(seen)
  return {p: sum(t[p] for t in totals) / len(totals) for p in totals[0]}


def output_gradients(loss_fn: LossFn, variables, batch,
                     layer_filter: LayerFilter = None) -> dict[LayerPath, jax.Array]:
  """{path: G [d_out, d_in+1]}, G_j = sum over probe tokens of dL/dy_j x~ (averaged over the
  batches), for the layers layer_filter keeps (None: all).

  G is the gradient in D of the loss with y + x~ D^T in place of every kept layer's output y,
  at D = 0: one backward pass per batch, memory of one training step.
  """
  batches = _as_batches(batch)
  found = find_growable_layers(loss_fn, variables, batches[0])
  zeros = {p: jnp.zeros((s["d_out"], s["d_in"] + 1), statistics_dtype(s["out"]))
           for p, s in found.items() if _keeps(layer_filter, p)}

  def loss_in_offsets(offsets, b):
    def offset(module, x, y):
      d = offsets[layer_path(module)]
      return y + (layers.with_bias_input(x.astype(d.dtype)) @ d.T).astype(y.dtype)
    with _on_growable_outputs(offset, layer_filter):
      return loss_fn(variables, b)
  grads = [jax.grad(loss_in_offsets)(zeros, b) for b in batches]
  return jax.tree.map(lambda *g: sum(g) / len(g), *grads)


def local_probe_gradient(x_tilde, z, g, probe, activation: str):
  """d/dD of one layer's probe branch sum g * probe(z, x~ D^T); its jvp in D is S V."""
  def local_loss(d):
    return jnp.sum(g * layers.probe_branch(z, x_tilde @ d.T, activation))
  return jax.grad(local_loss)(probe)


def group_layers(shapes: dict[LayerPath, tuple]) -> dict[tuple, list[LayerPath]]:
  """Layers sharing a key (e.g. (d_out, d_in, activation, dtype)), so one batched op serves
  them all: the qkv layers of every block of a uniform DeiT form one group."""
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


METHODS = ("collected", "streamed")


def _collected_pairs(stats, groups, start, restart_keys, num_iters):
  """Lanczos one layer at a time from collected statistics: {path: RitzPairs}.

  The products of a layer need only its own statistics, so the layers need not share a
  Krylov sequence: each runs alone and only one layer's basis, the spectrum's largest array,
  exists at any time. lax.map over each group of same-shaped layers keeps the compiled
  program as small as one layer's.
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
      return lanczos_extremes(lambda q: {"": product(q[""])}, {"": v}, rng, num_iters)[""]
    previous = jax.lax.map(one_layer, inputs)
    pairs.update({p: jax.tree.map(lambda a, i=i: a[i], previous) for i, p in enumerate(paths)})
  return pairs


def select_layers(found: dict[LayerPath, dict], layer_filter: LayerFilter) -> dict[LayerPath, dict]:
  """The entries of `found` whose layers layer_filter keeps (None: all of them)."""
  kept = {p: s for p, s in found.items() if _keeps(layer_filter, p)}
  if not kept:
    raise ValueError(f"layer_filter keeps none of the layers {sorted(found)}: nothing to "
                     "compute a spectrum for.")
  return kept


class TracedLoss:
  """A loss as a static jit argument, equal to another whenever both compute the same: keyed
  by the loss's traced computation on the given variables and batch (its jaxpr's text, the
  values of the arrays it closes over) and by the GrowableDense layers it calls, in order.

  jax.jit keys a static argument by equality, and two function objects are never equal: a fresh
  `lambda v, b: loss(model, v, b)` at every growth event, or the same loss written on another
  line, would compile the spectrum anew (seconds) although nothing it computes changed. The
  trace is what decides: two closures over different model objects of the same architecture
  share the program, two that compute differently (another constant, another layer) do not.
  `layers` {path: activation} are the calls' paths, which the spectrum's results are keyed by.
  """

  def __init__(self, fn: Callable, jaxpr, layers: tuple):
    self.fn = fn
    self._key = (str(jaxpr.jaxpr), tuple(map(_value_key, jaxpr.consts)), layers)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, TracedLoss) and self._key == other._key

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


def _value_key(array) -> tuple:
  """An array by value: shape, dtype and a digest of its bytes (a closed-over array that is
  another object may hold the same values, or other ones)."""
  value = np.asarray(array)
  return value.shape, str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()


def traced_loss(loss_fn: LossFn, variables, batch) -> tuple[TracedLoss, dict[LayerPath, dict]]:
  """(loss_fn keyed by its computation, find_growable_layers' result) from one trace of the
  loss on `batch` (one batch, not a list)."""
  jaxpr, found = _recorded_trace(loss_fn, variables, batch)
  return TracedLoss(loss_fn, jaxpr, tuple((p, s["activation"]) for p, s in found.items())), found


def _start_vectors(rng, shapes: dict[LayerPath, tuple], places: dict[LayerPath, int]):
  """(start [d_out, d_in+1] per layer, restart key per layer, restart key of a shared
  sequence) for layers of `shapes` {path: (d_out, d_in + 1, dtype)}. Keys follow a layer's
  place among all layers, so that a filter does not change the start vectors of the layers it
  keeps."""
  rng, restart_rng = jax.random.split(rng)
  start, restart_keys = {}, {}
  for p, (d_out, width, dtype) in shapes.items():
    k1, restart_keys[p] = jax.random.split(jax.random.fold_in(rng, places[p]))
    start[p] = random_unit_rows(k1, (d_out, width), dtype)
  return start, restart_keys, restart_rng


@functools.partial(jax.jit, static_argnames=("loss_fn", "kept"))
def _collected_statistics(loss_fn, variables, batch, kept):
  """The model's part of the collected method: statistics, and straight from them (no pass of
  their own, which would double the program's forward passes) G = sum_tokens g x~ and the
  input scales of the `kept` layers (paths)."""
  stats = collect_layer_statistics(loss_fn, variables, batch, kept.__contains__)
  gradients = {p: g.T @ x_tilde for p, (x_tilde, _, g) in stats.items()}
  scales = {p: input_scale(x_tilde) for p, (x_tilde, _, _) in stats.items()}
  return stats, gradients, scales


@functools.partial(jax.jit, static_argnames=("num_iters", "places", "activations"))
def _collected_solve(stats, rng, num_iters, places, activations):
  """The Lanczos part of the collected method: its program depends only on the statistics'
  shapes, which growth does not change, so it compiles once for all of a run's events."""
  places, activations = dict(places), dict(activations)
  shapes = {p: (z.shape[-1], x_tilde.shape[-1], z.dtype) for p, (x_tilde, z, _) in stats.items()}
  start, restart_keys, _ = _start_vectors(rng, shapes, places)
  # Same-shaped layers (the qkv of every block of a uniform DeiT) form one group that one set
  # of ops serves: far less to compile for deep models.
  groups = group_layers({p: (d_out, width - 1, activations[p], dtype)
                         for p, (d_out, width, dtype) in shapes.items()})
  return _collected_pairs(stats, groups, start, restart_keys, num_iters), start


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters", "kept"))
def _streamed(loss_fn, variables, batch, rng, num_iters, kept):
  """The streamed method, one program: every product re-runs the network for all `kept`
  layers (paths), one Krylov sequence for them all."""
  found = find_growable_layers(loss_fn, variables, _as_batches(batch)[0])
  shapes = {p: found[p] for p in kept}
  start, _, restart_rng = _start_vectors(
      rng, {p: (s["d_out"], s["d_in"] + 1, statistics_dtype(s["out"])) for p, s in shapes.items()},
      {p: i for i, p in enumerate(sorted(found))})
  groups = group_layers({p: (s["d_out"], s["d_in"], s["activation"], statistics_dtype(s["out"]))
                         for p, s in shapes.items()})
  hvp = streamed_hvp(loss_fn, variables, batch, {p: s["activation"] for p, s in shapes.items()})
  pairs = unstack_groups(lanczos_extremes(
      lambda vecs: stack_groups(hvp(unstack_groups(vecs, groups)), groups),
      stack_groups(start, groups), restart_rng, num_iters), groups)
  gradients = output_gradients(loss_fn, variables, batch, kept.__contains__)
  scales = input_scales(loss_fn, variables, batch, kept.__contains__)
  return pairs, start, gradients, scales


def _spectrum(loss_fn, variables, batch, rng, num_iters, method, layer_filter=None):
  # The layers of the first batch: loss_fn takes one batch, never the list.
  loss_fn, found = traced_loss(loss_fn, variables, _as_batches(batch)[0])
  shapes = select_layers(found, layer_filter)
  # The kept layers by path, a static argument: two filters that keep the same layers share
  # the programs.
  kept = tuple(sorted(shapes))
  if method == "collected":
    stats, gradients, scales = _collected_statistics(loss_fn, variables, batch, kept)
    pairs, start = _collected_solve(
        stats, rng, num_iters, tuple((p, i) for i, p in enumerate(sorted(found)) if p in shapes),
        tuple(sorted((p, s["activation"]) for p, s in shapes.items())))
  else:
    pairs, start, gradients, scales = _streamed(loss_fn, variables, batch, rng, num_iters, kept)
  return {p: Spectrum(eigvals=r.eigvals, eigvecs=r.eigvecs, residuals=r.residuals,
                      eigvals_max=r.eigvals_max, eigvecs_max=r.eigvecs_max, input_scale=scales[p],
                      start_dirs=start[p], start_rayleigh=r.start_rayleigh,
                      gradient=gradients[p], activation=shapes[p]["activation"])
          for p, r in pairs.items()}


def checked_key(rng, caller: str) -> jax.Array:
  """`rng` if it is a JAX key (jax.random.key's, or jax.random.PRNGKey's raw uint32[2]); key 0
  for None. Anything else is refused by `caller`'s name, with the call that makes a key."""
  if rng is None:
    return jax.random.key(0)
  dtype = getattr(rng, "dtype", None)
  if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                            or (dtype == np.uint32 and np.shape(rng) == (2,))):
    return rng
  example = rng if isinstance(rng, int) else 0
  raise TypeError(f"{caller}(rng={rng!r}): rng must be a JAX key, e.g. "
                  f"rng=jax.random.key({example})")


# Chosen for what growth uses: the neurons an event picks have the most negative eigenvalues,
# which Lanczos finds first, while eigenvalues near zero converge last and are never picked.
# tests/test_splitting.py checks at this value that the picks equal those of dense eigh;
# growth.num_iters trades accuracy near zero against cost per run (docs/method.md, "Lanczos").
DEFAULT_NUM_ITERS = 12


def splitting_spectrum(loss_fn: LossFn, variables, batch, *, num_iters: int = DEFAULT_NUM_ITERS,
                       rng: jax.Array | None = None, method: str = "collected",
                       layer_filter: LayerFilter = None) -> dict[LayerPath, Spectrum]:
  """The splitting-matrix extremes and first-order gradient of every neuron of every
  GrowableDense (Spectrum).

  loss_fn(variables, batch) -> scalar must be deterministic (no dropout, drop-path or
  augmentation noise): every Lanczos step must see the same operator. `batch` may be a
  list of batches; their splitting matrices are averaged. `method` is "collected"
  (fast, holds the probe's activations) or "streamed" (memory of one training step).

  layer_filter(path) -> bool, e.g. of "blocks_0/attn/qkv", says which layers to compute
  (None: all); the others cost nothing and are absent from the result.

  The spectrum compiles once per computation, batch shapes and settings: loss_fn is keyed by
  what it computes (TracedLoss: its trace on these variables), layer_filter by the layers it
  keeps, so a fresh closure such as `lambda v, b: loss(model, v, b)` at every event, or the
  same loss written elsewhere, reuses the compiled program.
  A kept layer starts from the same vectors whatever the filter; with method "streamed" the
  random vectors that restart a broken-down sequence depend on which layers are kept.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: choose one of {METHODS}")
  if num_iters < 1:
    raise ValueError(f"num_iters={num_iters}: must be >= 1")
  rng = checked_key(rng, "splitting_spectrum")
  return _spectrum(loss_fn, variables, batch, rng, num_iters, method, layer_filter)
