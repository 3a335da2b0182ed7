"""Architecture summary of a (grown) model as JSON: base widths, units per layer and stage, and
each stage's unit kind.

Stored in every checkpoint so that the grown model's abstract variables can be rebuilt
before restoring into them: `abstract_variables(spec, base)` adds the unit stages to the
abstract variables of the ungrown model (jax.eval_shape of model.init).
"""

import json

from clu import parameter_overview
from flax import traverse_util
import jax
import jax.numpy as jnp

from hetscale_jax import layers

FORMAT_VERSION = 2
# Format 1 predates the unit kinds: every stage of it holds gated units.
_READABLE = {1, FORMAT_VERSION}


def count_params(params) -> int:
  """Parameters of a (grown) parameter tree."""
  return int(parameter_overview.count_parameters(params))


def _layer_kernels(params) -> dict[str, tuple[int, int]]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k[:-len("/kernel")]: tuple(v.shape) for k, v in flat.items()
          if k.endswith("/kernel") and len(v.shape) == 2}


def from_variables(variables) -> dict:
  """{"format", "layers": {path: {"d_in", "d_out", "units": [units per stage], "kinds": [unit
  kind per stage]}}} for every dense layer (2-d kernel); "units" and "kinds" are empty for a
  layer that never grew."""
  growth = traverse_util.flatten_dict(variables.get(layers.GROWTH_COLLECTION, {}), sep="/")
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  summary = {}
  for path, (d_in, d_out) in sorted(_layer_kernels(variables["params"]).items()):
    kinds = [layers.stage_kind(params, k, path) for k in range(layers.num_stages(params, path))]
    units = [int(growth[f"{path}/{layers.unit_param_names(k, kind)[-1]}"].shape[0])
             for k, kind in enumerate(kinds)]
    summary[path] = {"d_in": d_in, "d_out": d_out, "units": units, "kinds": kinds}
  return {"format": FORMAT_VERSION, "layers": summary}


def to_json(spec: dict) -> str:
  return json.dumps(spec, indent=1, sort_keys=True)


def from_json(text: str) -> dict:
  """The spec of `text`, in this version's format."""
  return upgrade(json.loads(text))


def upgrade(spec: dict) -> dict:
  """A spec of any readable format in the current one (format 1: gated units only)."""
  if spec.get("format") not in _READABLE:
    raise ValueError(f"architecture spec format {spec.get('format')!r} is not one of the "
                     f"supported {sorted(_READABLE)}")
  return {"format": FORMAT_VERSION, "layers": {
      path: {"kinds": ["gated"] * len(layer["units"]), **layer}
      for path, layer in spec["layers"].items()}}


def abstract_variables(spec: dict, base):
  """The abstract variables of the grown model: `base` (abstract variables of the ungrown
  model) plus each layer's unit stages. Checks that the base widths agree with the spec."""
  kernels = _layer_kernels(base["params"])
  params = traverse_util.flatten_dict(base["params"], sep="/")
  for path, layer in spec["layers"].items():
    if kernels.get(path) != (layer["d_in"], layer["d_out"]):
      raise ValueError(f"spec layer {path!r} is {layer['d_in']}x{layer['d_out']} but the model "
                       f"has {kernels.get(path)}: the checkpoint belongs to another architecture")
  def abstract_stage(path, layer, stage):
    kind, n, dtype = layer["kinds"][stage], layer["units"][stage], params[f"{path}/kernel"].dtype
    return layers.UnitStage(kind, jax.ShapeDtypeStruct((n,), jnp.int32), {
        field: jax.ShapeDtypeStruct(shape, dtype)
        for field, shape in layers.unit_shapes(kind, n, layer["d_in"]).items()})

  out = base
  for stage in range(max((len(layer["units"]) for layer in spec["layers"].values()), default=0)):
    out = layers.add_unit_stages(out, {
        path: abstract_stage(path, layer, stage)
        for path, layer in spec["layers"].items() if stage < len(layer["units"])})
  return out


def unit_params(spec: dict) -> int:
  """Parameters held by units (layers.unit_param_count of each)."""
  return sum(n * layers.unit_param_count(kind, layer["d_in"])
             for layer in spec["layers"].values() for n, kind in zip(layer["units"], layer["kinds"]))


def describe(spec: dict) -> str:
  """One line per layer that grew: its units per stage."""
  lines = []
  for path, layer in spec["layers"].items():
    if layer["units"]:
      total = sum(layer["units"])
      kinds = "/".join(sorted(set(layer["kinds"])))
      lines.append(f"{path:<28} {layer['d_in']:>5}->{layer['d_out']:<5} units/stage "
                   f"{layer['units']}  ({total} {kinds} units on a layer of {layer['d_out']} "
                   "neurons)")
  return "\n".join(lines) if lines else "(no units)"
