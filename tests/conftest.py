"""Shared fixtures and independent reference computations for the numerical tests.

The references here (layer statistics, explicit splitting matrices, GELU's second derivative)
are written without the code under test, so that a test comparing the two can fail.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import os
import pathlib
from typing import Any, Callable

# Compiling dominates the suite's time, and LLVM's optimisations change no number a test
# compares: each compares computations compiled alike, or float64 references to a tolerance.
# Set before JAX starts its CPU backend; the runs tests start as subprocesses inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetscale_jax import checkpoint, splitting, train
from hetscale_jax.layers import GrowableDense
from hetscale_jax.models import deit


@contextlib.contextmanager
def enable_x64():
  """float64 within the context (for module-scoped fixtures); the previous setting after."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting afterwards."""
  with enable_x64():
    yield


def cast_floats(tree, dtype):
  """Every floating leaf of `tree` in `dtype` (integer leaves such as unit indices stay)."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, *args):
  """configs/<name>.py's get_config(*args)."""
  spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def tiny_config():
  """configs/tiny_test.py: 88 steps with growth events at steps 22 and 44."""
  return load_config("tiny_test")


@pytest.fixture(scope="session")
def xla_cache(request, tmp_path_factory):
  """A persistent compilation cache for the runs of the tiny config, in process and in
  subprocesses (in pytest's cache folder, so later sessions start warm)."""
  cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
  path = str(cache.mkdir("hetscale_jax_xla") if cache else tmp_path_factory.mktemp("xla"))
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()  # the cache is set up at the first compile of the process
  yield path
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


# Tests that use tiny_run carry this xdist group, so that one worker trains it for all of them.
TINY_RUN_GROUP = pytest.mark.xdist_group("tiny_run")


@pytest.fixture(scope="session")
def tiny_run(xla_cache, tmp_path_factory):
  """(workdir, summary) of the tiny config trained uninterrupted: every test reads it, none
  changes it. Trained after clearing JAX's in-memory caches, so that its compile counts are a
  fresh process's whichever tests this worker ran before."""
  jax.clear_caches()
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  return workdir, train.train_and_evaluate(tiny_config(), workdir)


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def snapshot(workdir) -> dict:
  """Every path under workdir with its size and modification time."""
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


def read_checkpoint(workdir: str, step: int) -> checkpoint.Final:
  """The checkpoint of `step` in `workdir`, read as checkpoint.read_latest reads the newest."""
  with checkpoint._reader(workdir) as (manager, _):
    return checkpoint._read_step(manager, step)


# ---------------------------------------------------------------------------------------------
# A small non-DeiT model: token-wise MLP built from GrowableDense, per-token cross-entropy.


class TokenMLP(nn.Module):
  """[batch, tokens, d_in] -> per-token logits, through GrowableDense layers and GELU."""

  hidden: tuple[int, ...] = (7, 6)
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden):
      x = nn.gelu(GrowableDense(width, name=f"dense_{i}")(x), approximate=False)
    return GrowableDense(self.num_classes, name="out")(x)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A model, its variables, a probe batch and a deterministic loss_fn(variables, batch)."""
  model: nn.Module
  variables: Any
  batch: Any
  loss_fn: Callable
  make_batch: Callable  # seed -> another batch of the same shape


def _cross_entropy_loss(model):
  # One function object per model, so that jit's static-argument cache sees a stable loss_fn.
  def loss_fn(variables, batch):
    inputs, labels = batch
    logits = model.apply(variables, inputs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return loss_fn


def memoised_per_x64(build):
  """Memoises build(...) per argument values and x64 setting (arrays made with and without
  x64 differ), and refuses float64 without x64, which JAX would silently make float32."""
  cached = functools.lru_cache(maxsize=None)(lambda x64, *args, **kwargs: build(*args, **kwargs))

  @functools.wraps(build)
  def wrapper(*args, **kwargs):
    dtype = kwargs.get("dtype", args[0] if args else jnp.float32)
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
      raise RuntimeError("float64 problem requested without x64: use the x64 fixture")
    return cached(bool(jax.config.jax_enable_x64), *args, **kwargs)
  return wrapper


@memoised_per_x64
def make_mlp(dtype=jnp.float32, d_in=5, hidden=(7, 6), num_classes=4, batch_size=2,
             tokens=3, seed=0) -> Problem:
  """6 probe tokens: d_in + 1 is 6, 8, 7 for the three layers, so the first layer's S_j are
  (generically) full rank and the others' rank-deficient: Lanczos breaks down and restarts."""
  model = TokenMLP(hidden=hidden, num_classes=num_classes)

  def make_batch(batch_seed):
    k1, k2 = jax.random.split(jax.random.key(1000 + batch_seed))
    inputs = jax.random.normal(k1, (batch_size, tokens, d_in), dtype)
    labels = jax.random.randint(k2, (batch_size, tokens), 0, num_classes)
    return inputs, labels

  batch = make_batch(seed)
  # jit: one compile instead of eager op-by-op initialisation (seconds for a DeiT).
  variables = cast_floats(jax.jit(model.init)(jax.random.key(seed), batch[0]), dtype)
  # Larger weights than lecun init so that GELU's curvature varies across tokens.
  variables = jax.tree.map(lambda a: 2.0 * a, variables)
  return Problem(model, variables, batch, _cross_entropy_loss(model), make_batch)


@pytest.fixture
def mlp():
  """Factory: mlp(dtype=..., **sizes) -> Problem (call it after x64 is enabled for float64).

  Memoised: the same arguments give the same Problem, hence the same loss_fn object, so the
  jitted spectrum compiled by one test is reused by the next (compiling dominates test time).
  """
  return make_mlp


# ---------------------------------------------------------------------------------------------
# A tiny DeiT with cross-entropy on the class token.

TINY_DEIT = dict(width=8, depth=2, num_heads=2, mlp_dim=16, patch_size=4)
TINY_IMG, TINY_CLASSES = 8, 5


@memoised_per_x64
def make_deit(dtype=jnp.float32, batch_size=2, img_size=TINY_IMG, num_classes=TINY_CLASSES,
              seed=0, **overrides) -> Problem:
  """deit.create("Ti", ...) with small widths; float64 casts the params and the activations."""
  model = deit.create("Ti", num_classes=num_classes, img_size=img_size,
                      **{**TINY_DEIT, "dtype": dtype, **overrides})

  def make_batch(batch_seed):
    k1, k2 = jax.random.split(jax.random.key(2000 + batch_seed))
    images = jax.random.normal(k1, (batch_size, img_size, img_size, 3), dtype)
    labels = jax.random.randint(k2, (batch_size,), 0, num_classes)
    return images, labels

  batch = make_batch(seed)
  variables = cast_floats(jax.jit(model.init)(jax.random.key(seed), batch[0]), dtype)

  def loss_fn(variables, batch):
    images, labels = batch
    logits = model.apply(variables, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return Problem(model, variables, batch, loss_fn, make_batch)


@pytest.fixture
def tiny_deit():
  """Factory: tiny_deit(dtype=..., **overrides) -> Problem."""
  return make_deit


# ---------------------------------------------------------------------------------------------
# Independent references.


def gelu_second_derivative(z):
  """d^2/dz^2 of z * Phi(z) = phi(z) * (2 - z^2), written out rather than differentiated
  (NumPy float64, so it does not depend on JAX's x64 setting)."""
  z = np.asarray(z, np.float64)
  return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi) * (2.0 - z * z)


def capture_layer_statistics(loss_fn, variables, batch):
  """{path: (x~ [T, d_in+1], z [T, d_out], g [T, d_out])} for every GrowableDense.

  Own capture (not hetscale_jax.splitting): an interceptor adds a named zero to each layer's
  output, and jax.grad of the loss with respect to those zeros is g = dL/dy.
  """
  def run(perturbations):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name == "__call__" and isinstance(module, GrowableDense):
        path = "/".join(module.path)
        x = args[0]
        x_tilde = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
        seen[path] = (x_tilde, out)
        if perturbations is not None:
          out = out + perturbations[path]
      return out

    with nn.intercept_methods(interceptor):
      loss = loss_fn(variables, batch)
    return loss, seen

  shapes = jax.eval_shape(lambda: run(None)[1])
  zeros = {p: jnp.zeros(y.shape, y.dtype) for p, (_, y) in shapes.items()}
  # jit: eager op-by-op dispatch of a whole model is far slower than one compile.
  grads, seen = jax.jit(jax.grad(run, has_aux=True))(zeros)
  flat = lambda a: np.asarray(a).reshape(-1, a.shape[-1])
  return {p: (flat(x), flat(y), flat(grads[p])) for p, (x, y) in seen.items()}


def explicit_splitting_matrices(stats, neurons=None):
  """{path: S [d_out (or len(neurons)), d_in+1, d_in+1]} = sum_t g s''(z) x~ x~^T (float64)."""
  out = {}
  for path, (x_tilde, z, g) in stats.items():
    x_tilde, z, g = (np.asarray(a, np.float64) for a in (x_tilde, z, g))
    if neurons is not None:
      z, g = z[:, neurons[path]], g[:, neurons[path]]
    weight = g * gelu_second_derivative(z)
    # One BLAS product per neuron: (x~ * w_j)^T x~.
    out[path] = np.stack([(x_tilde * w[:, None]).T @ x_tilde for w in weight.T])
  return out


# ---------------------------------------------------------------------------------------------
# Jitted helpers shared by the growth tests (module-level functions: compiled once per loss).


def exact_spectrum(problem, variables=None):
  """The spectrum with num_iters = the largest d_in + 1 (shared with test_splitting's runs)."""
  variables = problem.variables if variables is None else variables
  shapes = splitting.find_growable_layers(problem.loss_fn, variables, problem.batch)
  num_iters = max(s["d_in"] + 1 for s in shapes.values())
  return splitting.splitting_spectrum(problem.loss_fn, variables, problem.batch,
                                      num_iters=num_iters)


@functools.partial(jax.jit, static_argnums=0)
def params_grad(loss_fn, variables, batch):
  """dL/dparams with the other collections (unit indices) held fixed; jitted once per loss."""
  rest = {k: v for k, v in variables.items() if k != "params"}
  return jax.grad(lambda p: loss_fn({**rest, "params": p}, batch))(variables["params"])


@functools.partial(jax.jit, static_argnums=0)
def jit_loss(loss_fn, variables, batch):
  return loss_fn(variables, batch)


def relative_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual) - np.asarray(expected)))
               / np.max(np.abs(np.asarray(expected))))


# ---------------------------------------------------------------------------------------------
# A non-finite training step through uint8 batches.

POISON_PIXEL = 255  # the digits' pixels are 0..16, so no real batch holds it


def poison_saturated_images(monkeypatch):
  """Makes train's model input NaN for a batch holding a pixel of POISON_PIXEL: uint8 batches
  cannot carry a NaN themselves. Patch before the train step is built."""
  from hetscale_jax import train  # pylint: disable=g-import-not-at-top  (TF: only where used)
  real = train.model_input

  def model_input(config):
    normalize = real(config)
    return lambda images: jnp.where(jnp.any(images == POISON_PIXEL), jnp.nan, normalize(images))
  monkeypatch.setattr(train, "model_input", model_input)
