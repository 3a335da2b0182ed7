"""Architecture summary of a (grown) model as JSON: base widths and units per layer and stage.

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

FORMAT_VERSION = 1


def count_params(params) -> int:
  """Parameters of a (grown) parameter tree."""
  return int(parameter_overview.count_parameters(params))


def _layer_kernels(params) -> dict[str, tuple[int, int]]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k[:-len("/kernel")]: tuple(v.shape) for k, v in flat.items()
          if k.endswith("/kernel") and len(v.shape) == 2}


def from_variables(variables) -> dict:
  """{"format", "layers": {path: {"d_in", "d_out", "units": [units per stage]}}} for every
  dense layer (2-d kernel); "units" is empty for a layer that never grew."""
  growth = traverse_util.flatten_dict(variables.get(layers.GROWTH_COLLECTION, {}), sep="/")
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  summary = {}
  for path, (d_in, d_out) in sorted(_layer_kernels(variables["params"]).items()):
    units = [int(growth[f"{path}/{layers.unit_param_names(k)[2]}"].shape[0])
             for k in range(layers.num_stages(params, path))]
    summary[path] = {"d_in": d_in, "d_out": d_out, "units": units}
  return {"format": FORMAT_VERSION, "layers": summary}


def to_json(spec: dict) -> str:
  return json.dumps(spec, indent=1, sort_keys=True)


def from_json(text: str) -> dict:
  spec = json.loads(text)
  if spec.get("format") != FORMAT_VERSION:
    raise ValueError(f"architecture spec format {spec.get('format')!r} is not the supported "
                     f"{FORMAT_VERSION}")
  return spec


def abstract_variables(spec: dict, base):
  """The abstract variables of the grown model: `base` (abstract variables of the ungrown
  model) plus each layer's unit stages. Checks that the base widths agree with the spec."""
  kernels = _layer_kernels(base["params"])
  params = traverse_util.flatten_dict(base["params"], sep="/")
  for path, layer in spec["layers"].items():
    if kernels.get(path) != (layer["d_in"], layer["d_out"]):
      raise ValueError(f"spec layer {path!r} is {layer['d_in']}x{layer['d_out']} but the model "
                       f"has {kernels.get(path)}: the checkpoint belongs to another architecture")
  out = base
  for stage in range(max((len(layer["units"]) for layer in spec["layers"].values()), default=0)):
    out = layers.add_unit_stages(out, {
        path: (jax.ShapeDtypeStruct((layer["units"][stage], layer["d_in"] + 1), params[f"{path}/kernel"].dtype),
               jax.ShapeDtypeStruct((layer["units"][stage],), params[f"{path}/kernel"].dtype),
               jax.ShapeDtypeStruct((layer["units"][stage],), jnp.int32))
        for path, layer in spec["layers"].items() if stage < len(layer["units"])})
  return out


def unit_params(spec: dict) -> int:
  """Parameters held by units: d_in + 2 per unit."""
  return sum(sum(layer["units"]) * (layer["d_in"] + 2) for layer in spec["layers"].values())


def describe(spec: dict) -> str:
  """One line per layer that grew: its units per stage."""
  lines = []
  for path, layer in spec["layers"].items():
    if layer["units"]:
      total = sum(layer["units"])
      lines.append(f"{path:<28} {layer['d_in']:>5}->{layer['d_out']:<5} units/stage "
                   f"{layer['units']}  ({total} units on a layer of {layer['d_out']} neurons)")
  return "\n".join(lines) if lines else "(no units)"
