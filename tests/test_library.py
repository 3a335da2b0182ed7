"""hetscale_jax.grow as research code uses it: the README example as written, one compilation
per model and loss, caps that never shut a layer out, one RNG convention, budgets in units,
and units placed by hand."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exact_spectrum, make_mlp
from hetscale_jax import compile_log, grow, layers, optim, spec, splitting
from hetscale_jax.splitting import random_spectrum

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> list[str]:
  """The python blocks of the README's "Using it in research code" section: the model and data,
  training with growth and a checkpoint, the restore in a fresh process."""
  section = README.read_text().split("## Using it in research code", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_research_example_runs_as_written(tmp_path, monkeypatch):
  model_block, train_block, restore_block = readme_blocks()
  monkeypatch.chdir(tmp_path)  # the checkpoint's directory is relative
  namespace = {}
  exec(compile(model_block + train_block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  state, model, x, y = (namespace[k] for k in ("state", "model", "x", "y"))
  # The grown units trained: gains born at 0 moved, and so did their directions.
  at_event, trained = namespace["at_event"], namespace["trained"]
  np.testing.assert_array_equal(trained.neurons, at_event.neurons)
  assert len(at_event.neurons) >= 4 and np.all(at_event.params["a"] == 0)
  assert np.min(np.abs(trained.params["a"])) > 1e-3
  assert np.max(np.abs(trained.params["r"] - at_event.params["r"])) > 1e-3
  # optim.adamw counted the steps of live slots only: 10 for the first event's units, none for
  # the hand-placed ones and the slots still empty.
  hidden = layers.live_units(state.variables, "hidden")["gated"]
  counts = np.asarray(state.opt_state[0].count["hidden"]["gated_r"])
  first = np.isin(hidden.slots, at_event.slots)
  np.testing.assert_array_equal(counts[hidden.slots], np.where(first, 10, 0))
  assert np.all(np.delete(counts, hidden.slots) == 0)
  # The hand-placed units, added last, with gain 0, on top of any unit their neuron had.
  np.testing.assert_array_equal(hidden.neurons[-2:], [0, 5])
  np.testing.assert_array_equal(hidden.params["a"][-2:], [0, 0])
  np.testing.assert_array_equal(hidden.depths[-2:], np.isin([0, 5], at_event.neurons).astype(int))
  assert {kind for path in ("hidden", "out")
          for kind in layers.live_units(state.variables, path)} == {"gated", "linear"}
  assert sum(grow.select(namespace["spectrum"], max_units=8).counts().values()) == 8
  # A fresh process restores the checkpoint: the same logits.
  logits = np.asarray(model.apply(state.variables, x))
  script = model_block + restore_block + "np.save('restored.npy', model.apply(variables, x))\n"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-c", "import numpy as np\n" + script], cwd=tmp_path, env=env,
                 check=True, capture_output=True, timeout=600)
  np.testing.assert_array_equal(np.load(tmp_path / "restored.npy"), logits)
  # Restoring into another architecture is refused by name, before orbax reads anything.
  architecture = spec.from_json((tmp_path / "grown_mlp" / "spec.json").read_text())
  narrow = jax.eval_shape(model.init, jax.random.key(0), x[:, :4])
  with pytest.raises(ValueError, match=r"spec.abstract_variables: the spec's layer 'hidden' is "
                     r"8x32 but the model's is 4x32"):
    spec.abstract_variables(architecture, narrow)
  # The one-compile pattern: a fresh closure over the same model reuses the program.
  spectrum_of = lambda: grow.splitting_spectrum(lambda v, b: namespace["loss"](model, v, b),
                                                state.variables, (x, y))
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
                     kinds=lambda path: path, max_layer_fraction=1.0)
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


# ---------------------------------------------------------------------------------------------
# The traps of issue 37: each a test that failed before.


def two_live_units():
  """make_mlp's variables with two gated units of gain 1 on dense_1 (by add_units), the model
  and an input."""
  problem = make_mlp()
  r = np.random.default_rng(0).normal(size=(2, 7 + 1))
  return problem, grow.add_units(problem.variables, {"dense_1": ([4, 1], r, 1.0)})


def test_units_without_their_growth_collection_are_refused():
  problem, grown = two_live_units()
  x = problem.batch[0]
  with_units = problem.model.apply(grown, x)
  assert float(jnp.max(jnp.abs(with_units - problem.model.apply(problem.variables, x)))) > 1e-2
  with pytest.raises(ValueError, match=r"GrowableDense 'dense_1' has unit parameters "
                     r"\['gated_a', 'gated_r'\] but not the 'growth' collection .*"
                     r"model.apply\(variables, x\)"):
    problem.model.apply({"params": grown["params"]}, x)
  # Without units, params alone are all the variables there are.
  problem.model.apply({"params": problem.variables["params"]}, x)


def test_growth_compiles_nothing_on_new_shapes():
  """grow, add_units and reserve_slots are host work: a second event, whose units need larger
  packs than the first's, compiles nothing; migrating the optimizer state compiles one
  program."""
  problem = make_mlp(hidden=(9, 10))  # shapes no other test compiled
  spectrum = random_spectrum(problem.variables, seed=0)
  tx = optim.adamw(1e-3)
  opt_state = tx.init(problem.variables["params"])
  variables = problem.variables
  for unit, units in (("gated", 3), ("linear", 5), ("gated", 9)):
    plan = grow.select(spectrum, max_units=units, rule="random", unit=unit, max_layer_fraction=1.0)
    before = compile_log.totals()
    with compile_log.program("grow"):
      grown = grow.grow(variables, plan, spectrum)
      grow.add_units(grown, {"out": ([0], np.ones((1, 11)), [0.5])})
      grow.reserve_slots(grown, 2, "linear", 0.25, lambda path: True)
    with compile_log.program("migrate"):
      opt_state = grow.migrate_opt_state(tx, opt_state, grown["params"])
    counts = compile_log.since(before, ["grow", "migrate"])
    assert counts["grow"]["compiles"] == 0, (unit, units)
    assert counts["migrate"]["compiles"] == 1, (unit, units)
    variables = grown
  assert sum(len(u.neurons) for path in ("dense_0", "dense_1", "out")
             for u in layers.live_units(variables, path).values()) == 17


def test_select_takes_its_budget_by_name_and_says_why_a_plan_is_empty():
  spectrum = random_spectrum(make_mlp().variables, seed=0)  # dense_1: 7 inputs, 9 per unit
  with pytest.raises(TypeError, match="positional"):
    grow.select(spectrum, 8)  # pylint: disable=too-many-function-args
  with pytest.warns(grow.EmptyPlanWarning, match=r"budget=6 parameters is below one gated "
                    r"unit's 7 parameters \(budget counts parameters; max_units counts units\)"):
    assert grow.select(spectrum, budget=6).indices == {}
  with pytest.warns(grow.EmptyPlanWarning, match=r"no neuron scores below threshold=-100.0 under "
                    r"rule 'splitting'"):
    assert grow.select(spectrum, budget=10**6, threshold=-100.0).indices == {}
  with pytest.warns(grow.EmptyPlanWarning, match=r"budget=20 parameters gives 6 per kind, below "
                    r"one gated unit's 7"):
    grow.select(spectrum, budget=20, allocation="by_kind", kinds=lambda path: path)
  with pytest.raises(TypeError, match=r"select\(rng=3\): rng must be a JAX key, e\.g\. "
                     r"rng=jax\.random\.key\(3\)"):
    grow.select(spectrum, budget=100, rule="random", rng=3)
  legacy = grow.select(spectrum, budget=100, rule="random", rng=jax.random.PRNGKey(3))
  assert legacy.num_params > 0


def test_by_kind_reads_kinds_from_a_mapping():
  """Kinds are DeiT's names unless given: a layer of no kind gets no quota and a warning, as
  the language model's lm_head did."""
  spectrum = random_spectrum(make_mlp().variables, seed=0)
  lm = {"blocks_0/mlp/fc1": spectrum["dense_0"], "blocks_1/mlp/fc1": spectrum["dense_1"],
        "blocks_0/attn/qkv": spectrum["dense_1"], "lm_head": spectrum["out"]}
  with pytest.warns(UserWarning, match=r"layers \['lm_head'\] have no kind in `kinds`"):
    plan = grow.select(lm, max_units=4, rule="random", allocation="by_kind",
                       max_layer_fraction=1.0)
  counts = plan.counts()
  assert counts["blocks_0/attn/qkv"] == 2 and "lm_head" not in counts
  assert counts.get("blocks_0/mlp/fc1", 0) + counts.get("blocks_1/mlp/fc1", 0) == 2
  # One kind for both MLP layers and the head, by a dict of layer names or by a function.
  by_name = grow.select(lm, max_units=4, rule="random", allocation="by_kind",
                        kinds={"fc1": "dense", "lm_head": "dense", "qkv": "attn"},
                        max_layer_fraction=1.0)
  by_path = grow.select(lm, max_units=4, rule="random", allocation="by_kind",
                        kinds=lambda path: "attn" if "attn" in path else "dense",
                        max_layer_fraction=1.0)
  assert by_name.counts() == by_path.counts()
  assert by_name.counts()["blocks_0/attn/qkv"] == 2
  assert sum(n for p, n in by_name.counts().items() if "attn" not in p) == 2


def test_add_units_broadcasts_a_gain_and_reads_none_as_the_exact_unit():
  problem = make_mlp()
  r = np.random.default_rng(0).normal(size=(3, 7 + 1))
  explicit = grow.add_units(problem.variables, {"dense_1": ([0, 2, 4], r, np.full(3, 0.5))})
  scalar = grow.add_units(problem.variables, {"dense_1": ([0, 2, 4], r, 0.5)})
  jax.tree.map(np.testing.assert_array_equal, scalar, explicit)
  exact = grow.add_units(problem.variables, {"dense_1": ([0, 2, 4], r, None)})
  assert np.all(layers.live_units(exact, "dense_1")["gated"].params["a"] == 0)
  linear = grow.add_units(problem.variables, {"dense_1": ([1, 3], r[:2], None)}, unit="linear")
  jax.tree.map(np.testing.assert_array_equal, linear,
               grow.add_units(problem.variables, {"dense_1": ([1, 3], r[:2], -r[:2])},
                              unit="linear"))
  x = problem.batch[0]
  np.testing.assert_array_equal(problem.model.apply(linear, x),
                                problem.model.apply(problem.variables, x))


def test_live_units_reads_neurons_depths_and_parameters():
  problem = make_mlp()
  r = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
  variables = grow.reserve_slots(problem.variables, events=3, layer_filter=lambda p: p == "dense_1")
  variables = grow.add_units(variables, {"dense_1": ([4, 1], r[:2], [0.5, 0.25])})
  variables = grow.add_units(variables, {"dense_1": ([1], r[2:], 2.0)})  # on top of neuron 1's
  units = grow.live_units(variables, "dense_1")["gated"]
  np.testing.assert_array_equal(units.slots, [0, 1, 2])
  np.testing.assert_array_equal(units.neurons, [4, 1, 1])
  np.testing.assert_array_equal(units.depths, [0, 0, 1])
  np.testing.assert_array_equal(units.params["r"], r)
  np.testing.assert_array_equal(units.params["a"], [0.5, 0.25, 2.0])
  assert grow.live_units(variables, "dense_0") == {}
  # Reserved slots with no units (the default filter: every layer) read as no units.
  empty = grow.reserve_slots(problem.variables, events=2)
  assert {p: grow.live_units(empty, p)["gated"].neurons.size for p in ("dense_0", "dense_1", "out")} \
      == {"dense_0": 0, "dense_1": 0, "out": 0}


def test_params_in_place_of_variables_and_an_unmigrated_state_are_named():
  problem, grown = two_live_units()
  spectrum = random_spectrum(problem.variables, seed=0)
  plan = grow.select(spectrum, max_units=2, rule="random")
  for call in (lambda: grow.grow(problem.variables["params"], plan, spectrum),
               lambda: grow.add_units(problem.variables["params"], {}),
               lambda: grow.reserve_slots(problem.variables["params"], events=1),
               lambda: grow.live_units(problem.variables["params"], "out")):
    with pytest.raises(TypeError, match=r"takes the model's variables .* not "
                       r"variables\['params'\]: pass the whole variables"):
      call()
  tx = optim.adamw(1e-3)
  stale = tx.init(problem.variables["params"])
  grads = jax.tree.map(jnp.ones_like, grown["params"])
  with pytest.raises(ValueError, match=r"optim.adamw: the optimizer state does not match the "
                     r"parameters at \['dense_1'\]\['gated_a'\] \(state None, parameters \(8,\)\)"
                     r": after growing, migrate it with grow.migrate_opt_state"):
    tx.update(grads, stale, grown["params"])
  with pytest.raises(TypeError, match=r"migrate_opt_state takes the grown variables\['params'\]"):
    grow.migrate_opt_state(tx, stale, grown)
  tx.update(grads, grow.migrate_opt_state(tx, stale, grown["params"]), grown["params"])
