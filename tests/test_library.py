"""hetscale_jax.grow as research code uses it: the README example as written, one compilation
per model and loss, caps that never shut a layer out, one RNG convention, budgets in units,
and units placed by hand."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exact_spectrum, make_mlp
from hetscale_jax import grow, layers, splitting
from hetscale_jax.splitting import random_spectrum

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
  """The python block of the README's "Using it in research code" section."""
  section = README.read_text().split("## Using it in research code", 1)[1].split("\n## ", 1)[0]
  (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
  return code


def test_readme_research_example_runs_as_written():
  namespace = {}
  exec(compile(readme_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
  variables, model, x, y = (namespace[k] for k in ("variables", "model", "x", "y"))
  packs = layers.grown_layers(variables)
  hidden = packs["hidden"]["gated"]
  live = np.asarray(hidden.index)[np.asarray(hidden.live)]
  np.testing.assert_array_equal(live[-2:], [0, 5])  # the hand-placed units, added last
  assert {kind for layer in packs.values() for kind in layer} == {"gated", "linear"}
  assert sum(grow.select(namespace["spectrum"], max_units=8).counts().values()) == 8
  np.testing.assert_allclose(model.apply(namespace["ungrown"], x),
                             model.apply(model.init(jax.random.key(2), x), x), rtol=0, atol=1e-6)
  # Growth kept the function: the grown model computes what the initial one did.
  np.testing.assert_allclose(model.apply(variables, x), model.apply(namespace["ungrown"], x),
                             rtol=0, atol=1e-5)
  # The one-compile pattern: a fresh closure over the same model reuses the program.
  spectrum_of = lambda: grow.splitting_spectrum(lambda v, b: namespace["loss"](model, v, b),
                                                variables, (x, y))
  spectrum_of()
  before = splitting._collected_statistics._cache_size()  # pylint: disable=protected-access
  spectrum_of()
  assert splitting._collected_statistics._cache_size() == before  # pylint: disable=protected-access


def test_losses_that_compute_the_same_share_the_spectrums_program():
  """The spectrum's statistics program is keyed by the loss's trace: a loss written on another
  line, or closing over another model object of the same architecture, or over an equal array,
  reuses it; one that computes something else compiles."""
  problem = make_mlp()
  statistics = lambda: splitting._collected_statistics._cache_size()  # pylint: disable=protected-access
  spectrum = lambda loss: grow.splitting_spectrum(loss, problem.variables, problem.batch,
                                                  num_iters=3)
  before = statistics()
  first = spectrum(lambda v, b: problem.loss_fn(v, b))
  second = spectrum(lambda v, b: (
      problem.loss_fn(v, b)))                                  # the same, written elsewhere
  assert statistics() == before + 1
  jax.tree.map(np.testing.assert_array_equal, first, second)
  other = make_mlp(seed=1)  # another model object and variables, the same computation
  spectrum(lambda v, b: other.loss_fn(v, b))
  weight = jnp.asarray(2.0)
  spectrum(lambda v, b: weight * problem.loss_fn(v, b))
  assert statistics() == before + 2                            # a scaled loss is another
  equal, other_value = jnp.asarray(2.0), jnp.asarray(3.0)   # other arrays, closed over
  spectrum(lambda v, b: equal * problem.loss_fn(v, b))
  assert statistics() == before + 2                            # an equal constant: the same
  spectrum(lambda v, b: other_value * problem.loss_fn(v, b))
  assert statistics() == before + 3


def test_a_small_layer_is_never_shut_out_by_the_cap():
  """A 3-output head at the default fraction 0.25 (int(0.75) = 0) still takes one unit."""
  problem = make_mlp(num_classes=3)
  spectrum = random_spectrum(problem.variables, seed=0)
  assert spectrum["out"].eigvals.shape == (3,)
  plan = grow.select(spectrum, budget=10**6, threshold=1e9)
  assert plan.counts()["out"] == 1
  assert all(n == max(1, int(0.25 * spectrum[p].eigvals.shape[0])) for p, n in plan.counts().items())


@pytest.mark.parametrize("rule", ["random", "uniform"])
def test_same_inputs_same_plan_with_default_and_given_keys(rule):
  spectrum = random_spectrum(make_mlp().variables, seed=0)
  plans = [grow.select(spectrum, budget=100, rule=rule).indices for _ in range(2)]
  jax.tree.map(np.testing.assert_array_equal, *plans)
  keyed = [grow.select(spectrum, budget=100, rule=rule, rng=jax.random.key(7)).indices
           for _ in range(2)]
  jax.tree.map(np.testing.assert_array_equal, *keyed)


@pytest.mark.parametrize("unit", grow.UNITS)
def test_budget_in_units(unit):
  spectrum = random_spectrum(make_mlp().variables, seed=0)
  plan = grow.select(spectrum, max_units=5, rule="random", unit=unit, max_layer_fraction=1.0)
  assert sum(plan.counts().values()) == 5
  assert plan.num_params == sum(n * grow.spectrum_unit_cost(spectrum[p], unit)
                                for p, n in plan.counts().items())
  # Both limits: the tighter one holds.
  plan = grow.select(spectrum, budget=20, max_units=5, rule="random", unit=unit,
                     max_layer_fraction=1.0)
  assert plan.num_params <= 20 and sum(plan.counts().values()) <= 5
  # by_kind shares the units too: every layer is a kind here, 3 kinds of 2 units each.
  plan = grow.select(spectrum, max_units=6, rule="random", unit=unit, allocation="by_kind",
                     max_layer_fraction=1.0)
  assert plan.counts() == {"dense_0": 2, "dense_1": 2, "out": 2}


@pytest.mark.parametrize("unit", grow.UNITS)
def test_hand_placed_units_are_exact_and_checked(x64, unit):
  problem = make_mlp(jnp.float64)
  apply = jax.jit(lambda v: problem.model.apply(v, problem.batch[0]))
  rng = np.random.default_rng(0)
  d_in = problem.variables["params"]["dense_1"]["kernel"].shape[0]
  direction = rng.normal(size=(2, d_in + 1))
  second = np.zeros(2) if unit == "gated" else -direction
  units = {"dense_1": ([4, 1], direction, second)}
  grown = grow.add_units(problem.variables, units, unit=unit)
  assert float(jnp.max(jnp.abs(apply(grown) - apply(problem.variables)))) <= 1e-12
  live = grow.add_units(problem.variables, {"dense_1": ([4, 1], direction,
                                                          np.ones(2) if unit == "gated" else direction)},
                        unit=unit)
  assert float(jnp.max(jnp.abs(apply(live) - apply(problem.variables)))) > 1e-3
  # grow() is add_units with a plan's directions: one code path.
  spectrum = exact_spectrum(problem)
  plan = grow.select(spectrum, max_units=3, unit=unit, max_layer_fraction=1.0)
  params = problem.variables["params"]
  if unit == "gated":
    by_hand = {p: (i, np.asarray(spectrum[p].eigvecs)[i] * (1.0 / np.sqrt(float(spectrum[p].input_scale))),
                   np.zeros(len(i))) for p, i in plan.indices.items()}
  else:
    rows = {p: np.concatenate([np.asarray(params[p]["kernel"])[:, i].T,
                               np.asarray(params[p]["bias"])[i][:, None]], axis=1)
            for p, i in plan.indices.items()}
    by_hand = {p: (i, grow.LINEAR_INIT * rows[p], -grow.LINEAR_INIT * rows[p])
               for p, i in plan.indices.items()}
  jax.tree.map(np.testing.assert_array_equal, grow.add_units(problem.variables, by_hand, unit=unit),
               grow.grow(problem.variables, plan, spectrum))
  with pytest.raises(ValueError, match="need arrays of shapes"):
    grow.add_units(problem.variables, {"dense_1": ([0], direction, second)}, unit=unit)
  with pytest.raises(ValueError, match="distinct neurons"):
    grow.add_units(problem.variables, {"dense_1": ([3, 3], direction, second)}, unit=unit)
  with pytest.raises(KeyError, match="dense_9"):
    grow.add_units(problem.variables, {"dense_9": ([0, 1], direction, second)}, unit=unit)


def test_growth_compiles_the_spectrums_solve_once():
  """After growth only the model's part of the spectrum compiles again: the Lanczos program
  sees statistics of unchanged shapes."""
  problem = make_mlp()
  spectrum = grow.splitting_spectrum(problem.loss_fn, problem.variables, problem.batch, num_iters=4)
  solves = splitting._collected_solve._cache_size()  # pylint: disable=protected-access
  statistics = splitting._collected_statistics._cache_size()  # pylint: disable=protected-access
  plan = grow.select(spectrum, max_units=3, max_layer_fraction=1.0)
  grown = grow.grow(problem.variables, plan, spectrum)
  grow.splitting_spectrum(problem.loss_fn, grown, problem.batch, num_iters=4)
  assert splitting._collected_solve._cache_size() == solves  # pylint: disable=protected-access
  assert splitting._collected_statistics._cache_size() == statistics + 1  # pylint: disable=protected-access
