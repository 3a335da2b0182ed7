"""Unit-only training (hetscale_jax/unit_only.py): only one event's new slots learn; everything
else, earlier units included, stays bit-identical."""

from flax import traverse_util
import jax
import numpy as np
import pytest

from conftest import make_mlp
from hetscale_jax import grow, unit_only


def flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def two_events(problem):
  """(before, after) of a second growth event on the token MLP: the first put gated units on
  neurons 1 and 4 of dense_0 (8 slots) and on dense_1; the second adds gated units on all 7
  neurons of dense_0 (its pack grows to 12 slots) and a first pack of linear units on out."""
  rng = np.random.default_rng(0)
  r_first = rng.normal(size=(2, 6)).astype(np.float32)
  r_first[0, 0] = -0.0  # compared by its bytes below: its sign bit must survive as well
  first = grow.add_units(problem.variables, {
      "dense_0": ([1, 4], r_first, np.array([0.3, -0.2])),
      "dense_1": ([0, 5], rng.normal(size=(2, 8)), np.array([0.1, 0.4]))}, unit="gated")
  second = grow.add_units(first, {"dense_0": (np.arange(7), rng.normal(size=(7, 6)), np.zeros(7))},
                          unit="gated")
  p_plus = 0.5 * rng.normal(size=(3, 7))
  second = grow.add_units(second, {"out": ([0, 2, 3], p_plus, -p_plus)}, unit="linear")
  return first, second


@pytest.fixture(scope="module")
def grown():
  problem = make_mlp()
  return problem, *two_events(problem)


def four_batches(problem, first_seed=0):
  """As many batches in every test: the compiled training steps are shared."""
  return [problem.make_batch(seed) for seed in range(first_seed, first_seed + 4)]


def test_new_slots_are_the_slots_this_event_filled(grown):
  _, before, after = grown
  slots = {k: np.asarray(v) for k, v in unit_only.new_slots(before, after).items()}
  dense_0 = [False] * 2 + [True] * 7 + [False] * 3
  assert {k: v.tolist() for k, v in slots.items()} == {
      "dense_0/gated_r": dense_0, "dense_0/gated_a": dense_0,
      "dense_1/gated_r": [False] * 8, "dense_1/gated_a": [False] * 8,
      "out/linear_w": [True] * 3 + [False] * 5, "out/linear_b": [True] * 3 + [False] * 5}


def test_unit_only_training_moves_the_new_slots_alone(grown):
  problem, before, after = grown
  trainable = unit_only.new_slots(before, after)
  batches = four_batches(problem)
  trained = unit_only.train(problem.loss_fn, after, trainable, batches, learning_rate=1e-2)

  old, new = flat(after["params"]), flat(trained["params"])
  assert old.keys() == new.keys()
  for name, value in old.items():
    frozen = ~np.asarray(trainable[name]) if name in trainable else np.ones(len(value), bool)
    # Bit for bit: compare the bytes, which also tells -0.0 from 0.0.
    assert new[name][frozen].tobytes() == value[frozen].tobytes(), name
    if name in trainable and np.asarray(trainable[name]).any():
      assert not np.array_equal(new[name][~frozen], value[~frozen]), f"{name} did not train"
  assert flat(trained["growth"]).keys() == flat(after["growth"]).keys()
  for name, value in flat(after["growth"]).items():
    np.testing.assert_array_equal(flat(trained["growth"])[name], value)

  mean_loss = lambda v: np.mean([float(problem.loss_fn(v, b)) for b in batches])
  assert mean_loss(trained) < mean_loss(after) - 1e-3


def test_measure_reports_the_held_out_drop_per_added_parameter(grown):
  problem, before, after = grown
  batches, held_out = four_batches(problem), four_batches(problem, first_seed=20)
  result = unit_only.measure(problem.loss_fn, before, after, batches, held_out, 1e-2, num_params=100)
  trained = unit_only.train(problem.loss_fn, after, unit_only.new_slots(before, after), batches, 1e-2)
  held_out_loss = lambda v: np.mean([float(problem.loss_fn(v, b)) for b in held_out])
  assert result["steps"] == 4
  np.testing.assert_allclose(result["loss_before"], held_out_loss(after), rtol=1e-6)
  np.testing.assert_allclose(result["loss_after"], held_out_loss(trained), rtol=1e-6)
  assert result["drop_per_param"] == pytest.approx(
      (result["loss_before"] - result["loss_after"]) / 100, rel=1e-12)


def test_an_event_that_adds_nothing_trains_nothing(grown):
  problem, _, after = grown
  nothing = unit_only.new_slots(after, after)
  assert not any(np.asarray(m).any() for m in nothing.values())
  trained = unit_only.train(problem.loss_fn, after, nothing, four_batches(problem), learning_rate=1.0)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               trained, after)
