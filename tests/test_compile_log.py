"""compile_log counts what JAX compiles for a named program, and what its persistent cache
serves, on small jitted functions. (The counts of a training run: test_train, test_checkpoint.)"""

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from hetscale_jax import compile_log, train


def make_program():
  """A fresh jitted function each call: nothing in JAX's in-memory caches holds its programs.
  NumPy inputs: creating JAX arrays eagerly would compile programs of their own."""
  return jax.jit(lambda x: 2.0 * x + 1.0)


def test_counts_one_compile_per_new_shape_and_none_for_in_memory_hits():
  fn = make_program()
  before = compile_log.totals()
  with compile_log.program("toy"):
    fn(np.ones(3, np.float32))
    fn(np.ones(3, np.float32))  # jit's in-memory cache: nothing compiles
    fn(np.ones(4, np.float32))
  fn(np.ones(5, np.float32))  # compiles, but outside any named program
  counts = compile_log.since(before, ["toy", "never_run"])
  assert counts["toy"]["compiles"] == 2 and counts["toy"]["cache_hits"] == 0
  assert counts["toy"]["seconds"] > 0
  assert counts["never_run"] == {"compiles": 0, "cache_hits": 0, "seconds": 0}


def test_named_function_counts_its_calls_compiles_under_its_name():
  before = compile_log.totals()
  fn = compile_log.named("toy_named", make_program())
  np.testing.assert_allclose(fn(np.ones(2, np.float32)), 3.0)
  assert compile_log.since(before, ["toy_named"])["toy_named"]["compiles"] == 1


@pytest.fixture
def fresh_persistent_cache(tmp_path):
  """An empty persistent cache as training sets it up (every compile stored, a toy program's
  too); the previous settings afterwards (the other tests of this process share them)."""
  previous = {name: getattr(jax.config, name) for name in
              ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  train.use_compilation_cache(str(tmp_path))
  compilation_cache.reset_cache()  # JAX sets the cache up at its next compile
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def test_persistent_cache_serves_the_second_compile_of_the_same_program(fresh_persistent_cache):
  x = np.ones(6, np.float32)
  before = compile_log.totals()
  with compile_log.program("toy_cached"):
    make_program()(x)  # compiled by XLA, written to the cache
  first = compile_log.since(before, ["toy_cached"])["toy_cached"]
  with compile_log.program("toy_cached"):
    make_program()(x)  # the same program, not in memory: read from the cache
  both = compile_log.since(before, ["toy_cached"])["toy_cached"]
  assert (first["compiles"], first["cache_hits"]) == (1, 0)
  assert (both["compiles"], both["cache_hits"]) == (2, 1)


def test_describe_prints_every_program_in_one_line():
  line = compile_log.describe({
      "train_step": {"compiles": 3, "cache_hits": 1, "seconds": 8.04},
      "spectrum": {"compiles": 2, "cache_hits": 0, "seconds": 14.4}})
  assert line == ("compiled: train_step 3x in 8.0s (1 from the persistent cache), "
                  "spectrum 2x in 14.4s (0 from the persistent cache)")
