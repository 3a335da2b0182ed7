"""hetscale_jax.grow as research code uses it: the README example as written, one compilation
per model and loss, caps that never shut a layer out, one RNG convention, budgets in units,
and units placed by hand."""

import functools
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


def test_two_equal_closures_compile_the_spectrum_once():
  problem = make_mlp()
  make_loss = lambda fn: (lambda v, b: fn(v, b))  # a fresh function object on every call
  before = splitting._collected_statistics._cache_size()  # pylint: disable=protected-access
  first = grow.splitting_spectrum(make_loss(problem.loss_fn), problem.variables, problem.batch,
                                  num_iters=3)
  second = grow.splitting_spectrum(make_loss(problem.loss_fn), problem.variables, problem.batch,
                                   num_iters=3)
  assert splitting._collected_statistics._cache_size() == before + 1  # pylint: disable=protected-access
  jax.tree.map(np.testing.assert_array_equal, first, second)
  # A closure over another object is another computation: it compiles.
  other = make_mlp(seed=1)
  grow.splitting_spectrum(make_loss(other.loss_fn), problem.variables, problem.batch, num_iters=3)
  assert splitting._collected_statistics._cache_size() == before + 2  # pylint: disable=protected-access
  key = splitting.SameComputation
  assert key(make_loss(problem.loss_fn)) == key(make_loss(problem.loss_fn))
  assert key(make_loss(problem.loss_fn)) != key(make_loss(other.loss_fn))
  assert key(lambda v, b: 1) != key(lambda v, b: 2)  # other code
  # A closure over a fresh partial (as train.model_input makes one per growth event) is the
  # same computation when the partials are.
  over = lambda prepare: lambda v, b: prepare(b)
  assert key(over(functools.partial(max, 3))) == key(over(functools.partial(max, 3)))
  assert key(over(functools.partial(max, 3))) != key(over(functools.partial(max, 4)))


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
