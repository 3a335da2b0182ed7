"""Architecture spec: JSON round trip rebuilds the grown model's abstract variables."""

import jax
import jax.numpy as jnp
import pytest

from conftest import TINY_CLASSES, TINY_DEIT, TINY_IMG, make_deit
from hetscale_jax import grow, layers, spec
from hetscale_jax.models import deit
from hetscale_jax.splitting import random_spectrum


def _random_spectrum(variables, seed=0):
  """Random spectra of three layers (grow needs nothing else)."""
  return random_spectrum(variables, seed, lambda path: path in (
      "blocks_0/attn/qkv", "blocks_0/mlp/fc2", "blocks_1/mlp/fc1"))


def _grown_twice():
  problem = make_deit()
  spectrum = _random_spectrum(problem.variables)
  plan1 = grow.select(spectrum, budget=10**6, rule="random", max_layer_fraction=0.5, rng=jax.random.key(0))
  once = grow.grow(problem.variables, plan1, spectrum)
  # The second event grows only two of the layers, with the other kind of unit.
  plan2 = grow.select({p: spectrum[p] for p in ("blocks_0/attn/qkv", "blocks_1/mlp/fc1")},
                      budget=10**6, rule="random", unit="linear", max_layer_fraction=0.25, rng=jax.random.key(1))
  return problem, grow.grow(once, plan2, spectrum), (plan1, plan2)


def _shape_tree(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def test_json_round_trip_rebuilds_abstract_variables():
  problem, grown, (plan1, plan2) = _grown_twice()
  text = spec.to_json(spec.from_variables(grown))
  restored = spec.from_json(text)
  qkv = restored["layers"]["blocks_0/attn/qkv"]
  n1, n2 = len(plan1.indices["blocks_0/attn/qkv"]), len(plan2.indices["blocks_0/attn/qkv"])
  assert qkv["units"] == {"gated": [n1], "linear": [n2]}
  assert qkv["slots"] == {"gated": layers.capacity(n1), "linear": layers.capacity(n2)}
  assert restored["layers"]["blocks_0/mlp/fc2"]["units"] == {
      "gated": [len(plan1.indices["blocks_0/mlp/fc2"])]}
  assert restored["layers"]["blocks_1/attn/proj"]["units"] == {}
  base = jax.eval_shape(problem.model.init, jax.random.key(0), problem.batch[0])
  abstract = spec.abstract_variables(restored, base)
  assert jax.tree.structure(abstract) == jax.tree.structure(grown)
  assert _shape_tree(abstract) == _shape_tree(grown)
  # Unit parameter count: d_in + 2 per gated unit, 2 (d_in + 1) per linear one; padded slots
  # are no parameters.
  base_size = sum(x.size for x in jax.tree.leaves(base["params"]))
  assert (spec.unit_params(restored) == spec.count_params(grown) - base_size
          == plan1.num_params + plan2.num_params)
  assert sum(x.size for x in jax.tree.leaves(grown["params"])) > spec.count_params(grown)
  # The ungrown model: its spec rebuilds its own variables, with no growth collection.
  plain = spec.from_json(spec.to_json(spec.from_variables(problem.variables)))
  assert _shape_tree(spec.abstract_variables(plain, base)) == _shape_tree(base)
  assert layers.GROWTH_COLLECTION not in spec.abstract_variables(plain, base)
  assert "units" in spec.describe(restored) and spec.describe(plain) == "(no units)"


@pytest.mark.parametrize("old_format", [1, 2, 3])
def test_earlier_formats_read_when_ungrown_and_are_refused_when_grown(old_format):
  """Formats 1 and 2 (units per event) and 3 (one mask of depths over all slots): a model
  without units reads, a grown one is refused with a message naming both formats."""
  problem, grown, _ = _grown_twice()
  fields = {1: {}, 2: {"kinds": []}, 3: {"slots": {}}}[old_format]
  ungrown = {"format": old_format, "layers": {
      p: {"d_in": layer["d_in"], "d_out": layer["d_out"],
          "units": {} if old_format == 3 else [], **fields}
      for p, layer in spec.from_variables(problem.variables)["layers"].items()}}
  assert spec.from_json(spec.to_json(ungrown)) == spec.from_variables(problem.variables)
  units = {3: {"units": {"gated": [3]}, "slots": {"gated": 8}}, 2: {"units": [3], "kinds": ["gated"]},
           1: {"units": [3]}}[old_format]
  grown_old = {**ungrown, "layers": {**ungrown["layers"], "blocks_0/mlp/fc2": {
      **ungrown["layers"]["blocks_0/mlp/fc2"], **units}}}
  layout = "per growth event" if old_format < 3 else "packed per layer with a mask"
  with pytest.raises(ValueError, match=f"{layout}.*\\(architecture format {old_format}\\).*"
                                       f"lists each depth's slots \\(format {spec.FORMAT_VERSION}\\)"):
    spec.from_json(spec.to_json(grown_old))


def test_mismatched_base_widths_raise():
  _, grown, _ = _grown_twice()
  restored = spec.from_json(spec.to_json(spec.from_variables(grown)))
  other = deit.create("Ti", num_classes=TINY_CLASSES, img_size=TINY_IMG,
                      **{**TINY_DEIT, "mlp_dim": 24})
  base = jax.eval_shape(other.init, jax.random.key(0), jnp.zeros((1, TINY_IMG, TINY_IMG, 3)))
  with pytest.raises(ValueError, match="another architecture"):
    spec.abstract_variables(restored, base)
  with pytest.raises(ValueError, match="format"):
    spec.from_json('{"format": 99, "layers": {}}')
