"""GrowableDense: equal to nn.Dense without units; units are exact at a = 0, second order in
split mode, stack in order by depth, and padded slots are exactly inert."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from conftest import gelu_second_derivative
from hetscale_jax import grow, layers, optim
from hetscale_jax.layers import GrowableDense

D_IN, D_OUT = 5, 6


def _inputs(dtype, shape=(2, 3, D_IN), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _variables_with_stages(base_params, stages):
  """Variables of a GrowableDense with the gated units [(index, r, a), ...] added in order,
  one growth event each."""
  variables = {"params": {"dense": base_params}}
  for index, r, a in stages:
    variables = layers.add_unit_packs(
        variables, {"dense": layers.NewUnits("gated", index, {"r": r, "a": a})})
  return jax.tree.map(lambda tree: tree["dense"], variables, is_leaf=lambda t: "dense" in t)


def _base_params(dtype, seed=1):
  params = nn.Dense(D_OUT).init(jax.random.key(seed), jnp.zeros((1, D_IN)))["params"]
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  # A non-zero bias, so that the bias path is compared too.
  return {**params, "bias": jax.random.normal(jax.random.key(seed + 1), (D_OUT,), dtype)}


def _random_stage(index, seed, dtype, scale=0.7, gain=None):
  k1, k2 = jax.random.split(jax.random.key(seed))
  n = len(index)
  r = scale * jax.random.normal(k1, (n, D_IN + 1), dtype)
  a = jax.random.normal(k2, (n,), dtype) if gain is None else jnp.full((n,), gain, dtype)
  return index, r, a


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_without_units_equals_flax_dense_bit_for_bit(dtype):
  params = {"params": _base_params(jnp.float32)}
  x = _inputs(jnp.float32)
  expected = nn.Dense(D_OUT, dtype=dtype).apply(params, x)
  actual = GrowableDense(D_OUT, dtype=dtype).apply(params, x)
  assert actual.dtype == expected.dtype == dtype
  np.testing.assert_array_equal(np.asarray(actual, np.float32), np.asarray(expected, np.float32))


def test_zero_gain_units_leave_output_unchanged(x64):
  base = _base_params(jnp.float64)
  x = _inputs(jnp.float64)
  apply = jax.jit(GrowableDense(D_OUT).apply)  # one compile per variable structure
  plain = apply({"params": base}, x)
  # Two stages, neuron 3 in both: the second unit sits on the first's output.
  stages = [_random_stage(np.array([1, 3]), 10, jnp.float64, gain=0.0),
            _random_stage(np.array([3, 0, 5]), 11, jnp.float64, gain=0.0)]
  grown = apply(_variables_with_stages(base, stages), x)
  assert float(jnp.max(jnp.abs(grown - plain))) <= 1e-12
  # The same stages with a non-zero gain do change the output: the units are really read.
  live = [(i, r, jnp.ones_like(a)) for i, r, a in stages]
  assert float(jnp.max(jnp.abs(apply(_variables_with_stages(base, live), x) - plain))) > 1e-3


def test_split_mode_is_second_order_in_r(x64):
  """a = 1, r = eps v: y_j = z_j + 1/2 s''(z_j) (r.x~)^2 + O(eps^4) on the grown neurons."""
  base = _base_params(jnp.float64)
  x = _inputs(jnp.float64, shape=(4, 7, D_IN))
  apply = jax.jit(GrowableDense(D_OUT).apply)
  z = np.asarray(apply({"params": base}, x))
  x_tilde = np.concatenate([np.asarray(x), np.ones(x.shape[:-1] + (1,))], axis=-1)
  index = np.array([0, 2, 5])
  direction = np.asarray(jax.random.normal(jax.random.key(3), (len(index), D_IN + 1), jnp.float64))

  def expansion_error(eps):
    r = eps * direction
    y = np.asarray(apply(_variables_with_stages(base, [(index, jnp.asarray(r), jnp.ones(3))]), x))
    others = np.setdiff1d(np.arange(D_OUT), index)
    np.testing.assert_array_equal(y[..., others], z[..., others])
    second_order = 0.5 * gelu_second_derivative(z[..., index]) * np.einsum("...i,ni->...n", x_tilde, r) ** 2
    return np.max(np.abs(y[..., index] - z[..., index] - second_order)), np.max(np.abs(second_order))

  err_big, term_big = expansion_error(0.1)
  err_small, _ = expansion_error(0.05)
  assert err_big < 0.05 * term_big  # the second-order term describes the unit
  # Halving eps divides a fourth-order remainder by 16.
  assert 12 < err_big / err_small < 20, (err_big, err_small)


def _gelu_numpy(z):
  return 0.5 * z * (1.0 + special.erf(z / np.sqrt(2.0)))


def _silu_numpy(z):
  return z / (1.0 + np.exp(-z))


@pytest.mark.parametrize("activation, reference", [("gelu", _gelu_numpy), ("silu", _silu_numpy)])
def test_stages_apply_in_order(x64, activation, reference):
  """A hand-written loop over units, stage after stage, in NumPy."""
  base = _base_params(jnp.float64)
  x = _inputs(jnp.float64)
  stages = [_random_stage(np.array([4, 1]), 20, jnp.float64),
            _random_stage(np.array([1, 2, 4]), 21, jnp.float64)]  # neurons 1 and 4 twice
  layer = GrowableDense(D_OUT, unit_activation=activation)
  actual = np.asarray(layer.apply(_variables_with_stages(base, stages), x))

  def by_hand(ordered_stages):
    xn = np.asarray(x)
    x_tilde = np.concatenate([xn, np.ones(xn.shape[:-1] + (1,))], axis=-1)
    y = xn @ np.asarray(base["kernel"]) + np.asarray(base["bias"])
    for index, r, a in ordered_stages:
      for n, j in enumerate(index):
        z, p = y[..., j].copy(), x_tilde @ np.asarray(r[n])
        y[..., j] = z + float(a[n]) * (0.5 * reference(z + p) + 0.5 * reference(z - p) - reference(z))
    return y

  np.testing.assert_allclose(actual, by_hand(stages), rtol=0, atol=1e-12)
  # The order matters (so the comparison above can tell): the reversed order differs.
  assert np.max(np.abs(actual - by_hand(stages[::-1]))) > 1e-4


@pytest.mark.parametrize("dtype, bound", [(np.float32, 4e-7), (np.float64, 1e-15)])
def test_exact_gelu_is_v_phi_to_about_one_rounding_of_one(x64, dtype, bound):
  """s(v) / v against Phi(v) from SciPy: within about one rounding of 1 everywhere, the price
  the docstring names of computing 1 + erf."""
  v = np.linspace(-12.0, 12.0, 240001).astype(dtype)
  v = v[np.abs(v) > 1e-3]
  cdf = np.asarray(jax.jit(layers.exact_gelu)(v), np.float64) / v.astype(np.float64)
  error = np.max(np.abs(cdf - special.ndtr(v.astype(np.float64))))
  assert error <= bound, error


def _gelu_slope_numpy(z):
  return 0.5 * (1.0 + special.erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def test_skip_unit_derivatives_gelu_closed_form(x64):
  """The written-out derivative of u(z, p) against s' and s'' of GELU in closed form: the
  gradient, and the jvp of the gradient that the spectrum takes through grown layers."""
  z = jnp.linspace(-2.5, 2.0, 11)
  p = jnp.linspace(1.5, -1.0, 11)
  w = jnp.linspace(0.3, 1.7, 11)
  loss = lambda z, p: jnp.sum(w * layers.skip_unit(z, p))
  zn, pn, wn = map(np.asarray, (z, p, w))
  s1, s2 = _gelu_slope_numpy, gelu_second_derivative
  grad_z, grad_p = jax.grad(loss, argnums=(0, 1))(z, p)
  np.testing.assert_allclose(grad_z, wn * (0.5 * s1(zn + pn) + 0.5 * s1(zn - pn) - s1(zn)),
                             rtol=0, atol=1e-13)
  np.testing.assert_allclose(grad_p, wn * 0.5 * (s1(zn + pn) - s1(zn - pn)), rtol=0, atol=1e-13)
  # d/dt grad at (z + t dz, p + t dp): the Hessian of u, row by row, times (dz, dp).
  dz, dp = jnp.cos(3 * z), jnp.sin(2 * p)
  _, (hz, hp) = jax.jvp(jax.grad(loss, argnums=(0, 1)), (z, p), (dz, dp))
  plus, minus = s2(zn + pn), s2(zn - pn)
  h_zz, h_zp, h_pp = 0.5 * plus + 0.5 * minus - s2(zn), 0.5 * (plus - minus), 0.5 * (plus + minus)
  dzn, dpn = np.asarray(dz), np.asarray(dp)
  np.testing.assert_allclose(hz, wn * (h_zz * dzn + h_zp * dpn), rtol=0, atol=1e-13)
  np.testing.assert_allclose(hp, wn * (h_zp * dzn + h_pp * dpn), rtol=0, atol=1e-13)


@pytest.mark.parametrize("activation", sorted(layers.ACTIVATIONS))
def test_skip_unit_derivatives_equal_those_of_its_formula(x64, activation):
  """Every activation: first and second derivatives equal JAX's of the unwritten formula."""
  s = layers.activation_fn(activation)
  formula = lambda z, p: 0.5 * s(z + p) + 0.5 * s(z - p) - s(z)
  z, p = jnp.linspace(-2.0, 2.5, 9), jnp.linspace(0.8, -1.2, 9)
  tangents = (jnp.cos(z), jnp.sin(3 * p))

  def derivatives(unit):
    """(gradient, Hessian times the tangents) of sum tanh(unit(z, p)) in (z, p)."""
    grad = jax.grad(lambda z, p: jnp.sum(jnp.tanh(unit(z, p))), argnums=(0, 1))
    return np.stack(grad(z, p)), np.stack(jax.jvp(grad, (z, p), tangents)[1])

  written = derivatives(lambda z, p: layers.skip_unit(z, p, activation))
  expected = derivatives(formula)
  np.testing.assert_allclose(written[0], expected[0], rtol=0, atol=1e-14)
  np.testing.assert_allclose(written[1], expected[1], rtol=0, atol=1e-13)


def test_unknown_unit_activation_raises():
  with pytest.raises(ValueError, match="unknown unit activation"):
    layers.activation_fn("relu6")


def test_units_stack_by_depth_in_padded_slots():
  base = _base_params(jnp.float32)
  stages = [_random_stage(np.array([4, 1]), 20, jnp.float32),
            _random_stage(np.array([1, 2, 4]), 21, jnp.float32)]
  growth = _variables_with_stages(base, stages)[layers.GROWTH_COLLECTION]
  slots = layers.capacity(5)
  assert slots == layers.MIN_CAPACITY
  np.testing.assert_array_equal(growth["gated_index"], [4, 1, 1, 2, 4] + [0] * (slots - 5))
  np.testing.assert_array_equal(growth["gated_depth_0"], [0, 1, 3])  # first units on 4, 1, 2
  np.testing.assert_array_equal(growth["gated_depth_1"], [2, 4])     # the second on 1 and 4
  assert "gated_depth_2" not in growth and "gated_held" not in growth
  assert [layers.capacity(n) for n in (0, 1, 8, 9, 13, 17, 25, 33, 100)] == [
      8, 8, 8, 12, 16, 24, 32, 48, 128]


def test_a_pack_that_grows_reserves_slots_for_the_events_to_come():
  """Events like the first fit the slots it chose; a pack only grows when the units do not fit,
  and then reserves again. Each depth lists exactly its units, whatever the slots."""
  rng = np.random.default_rng(0)
  variables = {"params": {"dense": _base_params(jnp.float32)}}

  def add(index, reserve_events):
    n = len(index)
    units = layers.NewUnits("gated", np.asarray(index), {
        "r": rng.normal(size=(n, D_IN + 1)).astype(np.float32), "a": np.zeros(n, np.float32)})
    out = layers.add_unit_packs(variables, {"dense": units}, reserve_events)
    pack = layers.grown_layers(out)["dense"]["gated"]
    return out, (pack.index.shape[0], [d.shape[0] for d in pack.depths])

  variables, shape = add([0, 1, 2, 3, 4], reserve_events=2)  # room for 15 units
  assert shape == (16, [5])
  variables, shape = add([0, 1, 2, 3, 4], reserve_events=1)  # depth 1: fits
  assert shape == (16, [5, 5])
  variables, shape = add([0, 1, 2, 3, 4, 5], reserve_events=0)  # 16 units: fits
  assert shape == (16, [6, 5, 5])
  variables, shape = add([0], reserve_events=1)  # 17 units, depth 3: grows, reserving again
  assert shape == (24, [6, 5, 5, 1])


@pytest.mark.parametrize("kind", ["gated", "linear"])
def test_padded_slots_are_inert(kind):
  """Whatever a padded slot holds, it adds nothing and gets no gradient; the optimizer keeps
  its parameters and state at exactly zero over training steps, while the units step."""
  base = _base_params(jnp.float32)
  rng = np.random.default_rng(0)
  first = rng.normal(size=(3, D_IN + 1)).astype(np.float32)
  second = (rng.normal(size=3).astype(np.float32) if kind == "gated"
            else rng.normal(size=(3, D_IN + 1)).astype(np.float32))
  units = {"dense": (np.array([0, 2, 5]), first, second)}
  variables = grow.add_units({"params": {"dense": base}}, units, unit=kind)
  variables = jax.tree.map(lambda tree: tree["dense"], variables, is_leaf=lambda t: "dense" in t)
  field = layers.param_name(kind, layers.UNIT_KINDS[kind][0])
  x = _inputs(jnp.float32)
  apply = jax.jit(GrowableDense(D_OUT).apply)
  # Garbage in the padded slots (3 and on) changes nothing: they are masked.
  garbage = {**variables, "params": {**variables["params"],
                                     field: variables["params"][field].at[3:].set(5.0)}}
  np.testing.assert_array_equal(apply(garbage, x), apply(variables, x))
  grads = jax.grad(lambda p: jnp.sum(apply({**garbage, "params": p}, x) ** 2))(garbage["params"])
  assert np.all(np.asarray(grads[field][3:]) == 0) and np.any(np.asarray(grads[field][:3]) != 0)

  tx = optim.adamw(1e-2, weight_decay=0.1)
  params, opt_state = variables["params"], tx.init(variables["params"])
  live = layers.live_slots(variables)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.sum(apply({**variables, "params": p}, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params, live=live)
    return optax.apply_updates(params, updates), opt_state
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  adam = opt_state[0]
  for name in layers.UNIT_KINDS[kind]:
    name = layers.param_name(kind, name)
    assert np.all(np.asarray(params[name][3:]) == 0), name
    assert np.any(np.asarray(params[name][:3]) != np.asarray(variables["params"][name][:3])), name
    np.testing.assert_array_equal(adam.count[name], [3, 3, 3] + [0] * (layers.MIN_CAPACITY - 3))
    assert np.all(np.asarray(adam.mu[name][3:]) == 0) and np.all(np.asarray(adam.nu[name][3:]) == 0)


def _one_layer(variables):
  """{collection: the "dense" layer's variables}: what GrowableDense.apply takes."""
  return {name: tree["dense"] for name, tree in variables.items()}


def _three_depths(dtype, room: int = 7):
  """Variables of one GrowableDense with gated units at three depths (exact lists), and the
  same units in a pack with room: every depth listing `room` slots (empty ones padded)."""
  base = _base_params(dtype)
  stages = [_random_stage(np.array([4, 1, 0]), 30, dtype),
            _random_stage(np.array([1, 2, 4]), 31, dtype),
            _random_stage(np.array([1]), 32, dtype)]
  exact = _variables_with_stages(base, stages)
  pack = layers.empty_pack("gated", layers.capacity(room), D_IN, dtype, room=(room,) * 3)
  held = layers.set_packs({"params": {"dense": base}}, {"dense": {"gated": pack}})
  for index, r, a in stages:
    held = layers.add_unit_packs(held, {"dense": layers.NewUnits("gated", index, {"r": r, "a": a})})
  held = _one_layer(held)
  return exact, held


@pytest.mark.parametrize("room", [7, 130])  # the whole lists; prefixes of 8 of them
def test_a_pack_with_room_computes_what_exact_lists_compute(x64, room):
  """Lists padded to a schedule's room (held counts, prefixes chosen at run time) give the
  values and gradients that lists as long as their units give."""
  exact, held = _three_depths(jnp.float64, room)
  assert [len(d) for d in layers.layer_packs(held["params"], held["growth"])["gated"].depths] == [room] * 3
  np.testing.assert_array_equal(held["growth"]["gated_held"], [4, 2, 1])
  assert layers.bucket_sizes(7) == [0, 7] and layers.bucket_sizes(48) == [0, 12, 48]
  assert layers.bucket_sizes(130) == [0, 8, 32, 130]
  x = _inputs(jnp.float64)
  apply = jax.jit(GrowableDense(D_OUT).apply)
  loss = lambda params, v: jnp.sum(jnp.sin(apply({**v, "params": params}, x)))
  np.testing.assert_allclose(apply(held, x), apply(exact, x), rtol=0, atol=1e-12)
  g_exact, g_held = jax.grad(loss)(exact["params"], exact), jax.grad(loss)(held["params"], held)
  for name, value in g_exact.items():
    slots = len(value)  # the pack with room holds more slots, whose gradients are zero
    np.testing.assert_allclose(g_held[name][:slots], value, rtol=0, atol=1e-12, err_msg=name)
    assert not np.any(g_held[name][slots:]), name


def test_whole_lists_keep_the_function_and_the_shapes_of_a_pack_with_room(x64):
  """whole_lists drops a pack with room's held counts and nothing else: every depth then computes
  its whole padded list (the empty entries exactly zero), the function and its gradients those
  of the exact lists, in shapes that units added to the room do not change."""
  exact, held = _three_depths(jnp.float64)
  whole = layers.whole_lists(held)
  assert sorted(whole["growth"]) == sorted(set(held["growth"]) - {"gated_held"})
  for name, value in whole["growth"].items():
    np.testing.assert_array_equal(value, held["growth"][name], err_msg=name)
  x = _inputs(jnp.float64)
  apply = jax.jit(GrowableDense(D_OUT).apply)
  np.testing.assert_allclose(apply(whole, x), apply(exact, x), rtol=0, atol=1e-12)
  loss = lambda params, v: jnp.sum(jnp.sin(apply({**v, "params": params}, x)))
  g_exact, g_whole = jax.grad(loss)(exact["params"], exact), jax.grad(loss)(whole["params"], whole)
  for name, value in g_exact.items():
    np.testing.assert_allclose(g_whole[name][:len(value)], value, rtol=0, atol=1e-12, err_msg=name)
  index, r, a = _random_stage(np.array([3]), 33, jnp.float64)
  more = _one_layer(layers.add_unit_packs({k: {"dense": v} for k, v in held.items()}, {
      "dense": layers.NewUnits("gated", index, {"r": r, "a": a})}))
  np.testing.assert_array_equal(more["growth"]["gated_held"], [5, 2, 1])
  assert jax.tree.map(np.shape, layers.whole_lists(more)) == jax.tree.map(np.shape, whole)


def test_the_two_dispatches_compute_the_same(x64, monkeypatch):
  """Gather and scatter, or one-hot matmuls: the same values and gradients, also where a list
  names no slot (a pack with room)."""
  x = _inputs(jnp.float64)
  for variables in _three_depths(jnp.float64):
    results = {}
    for how in ("gather", "onehot"):
      monkeypatch.setattr(layers, "DEFAULT_DISPATCH", how)
      apply = jax.jit(GrowableDense(D_OUT).apply)
      loss = lambda params: jnp.sum(jnp.sin(apply({**variables, "params": params}, x)))
      results[how] = (apply(variables, x), jax.grad(loss)(variables["params"]))
    np.testing.assert_allclose(results["onehot"][0], results["gather"][0], rtol=0, atol=1e-12)
    for name, value in results["gather"][1].items():
      np.testing.assert_allclose(results["onehot"][1][name], value, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="unknown unit dispatch"):
    layers.dispatch("scatter")


def test_only_the_units_compute_not_the_slots():
  """XLA's flop count of a layer with 3 units in 96 slots (room for later events) is that of
  the same 3 units in 8 slots: empty slots cost no compute."""
  base = _base_params(jnp.float32)
  x = _inputs(jnp.float32, shape=(64, D_IN))
  index, r, a = _random_stage(np.array([4, 1, 0]), 40, jnp.float32)

  def flops(reserve_events):
    variables = layers.add_unit_packs({"params": {"dense": base}}, {
        "dense": layers.NewUnits("gated", index, {"r": r, "a": a})}, reserve_events)
    variables = _one_layer(variables)
    loss = lambda p: jnp.sum(GrowableDense(D_OUT).apply({**variables, "params": p}, x) ** 2)
    return jax.jit(jax.grad(loss)).lower(variables["params"]).compile().cost_analysis()["flops"]
  slots_of = lambda n: layers.capacity(3 * (1 + n))
  assert slots_of(30) >= 12 * slots_of(0)
  assert flops(30) < 1.05 * flops(0)
