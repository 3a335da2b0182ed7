"""Architecture summary of a (grown) model as JSON: base widths, and per layer and unit kind
the units at each depth, the slots that hold them and, in a pack with room, each depth's room.

Stored in every checkpoint so that the grown model's abstract variables can be rebuilt
before restoring into them: `abstract_variables(spec, base)` adds the unit packs to the
abstract variables of the ungrown model (jax.eval_shape of model.init).
"""

import json

from flax import traverse_util
import numpy as np

from hetscale_jax import layers, sharding

FORMAT_VERSION = 4
# Formats 1 and 2 stored one set of arrays per growth event ("units{k}_r", ...); format 3
# packed each kind's units into one set per layer with a [depths, slots] mask of where each
# unit sits; format 4 lists each depth's slots (layers.py). A model without units reads the
# same in all.
_READABLE = {1, 2, 3, FORMAT_VERSION}


def _growth_on_host(variables):
  """variables with the growth collection (slot indices and depths, small) as numpy on every
  process, also where it is a global array over the devices of several processes."""
  return {**variables, layers.GROWTH_COLLECTION: sharding.host_value(
      variables.get(layers.GROWTH_COLLECTION, {}))}


def count_params(variables) -> int:
  """Parameters of a (grown) model: every parameter, but of the unit fields only the slots
  that hold a unit (padded slots are no parameters of the model)."""
  variables = _growth_on_host(variables)
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  live = traverse_util.flatten_dict(layers.live_slots(variables), sep="/")
  return sum(int(np.prod(np.shape(v)[1:])) * int(np.sum(live[k]))
             if layers.is_unit_param(k.rsplit("/", 1)[-1]) else int(np.size(v))
             for k, v in params.items())


def _layer_kernels(params) -> dict[str, tuple[int, int]]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k[:-len("/kernel")]: tuple(v.shape) for k, v in flat.items()
          if k.endswith("/kernel") and len(v.shape) == 2}


def from_variables(variables) -> dict:
  """{"format", "layers": {path: {"d_in", "d_out", "units": {kind: [units at each depth]},
  "slots": {kind: slots}, "room": {kind: [slots each depth lists]}}}} for every dense layer
  (2-d kernel); "room" names only the packs with room (grow.reserve_slots), whose depths list
  more slots than they hold units; all three are empty for a layer that never grew."""
  grown = layers.grown_layers(_growth_on_host(variables))
  summary = {}
  for path, (d_in, d_out) in sorted(_layer_kernels(variables["params"]).items()):
    packs = grown.get(path, {})
    summary[path] = {
        "d_in": d_in, "d_out": d_out,
        "units": {kind: p.units_per_depth() for kind, p in packs.items()},
        "slots": {kind: int(np.shape(p.index)[0]) for kind, p in packs.items()},
        "room": {kind: [int(np.shape(d)[0]) for d in p.depths] for kind, p in packs.items()
                 if p.held is not None}}
  return {"format": FORMAT_VERSION, "layers": summary}


def to_json(spec: dict) -> str:
  return json.dumps(spec, indent=1, sort_keys=True)


def from_json(text: str) -> dict:
  """The spec of `text`, in this version's format."""
  return upgrade(json.loads(text))


def upgrade(spec: dict) -> dict:
  """A spec of any readable format in the current one. A grown model of an earlier format is
  refused: its units are stored in another layout, which this version does not read."""
  if spec.get("format") not in _READABLE:
    raise ValueError(f"architecture spec format {spec.get('format')!r} is not one of the "
                     f"supported {sorted(_READABLE)}")
  if spec["format"] == FORMAT_VERSION:
    return spec
  if any(layer["units"] for layer in spec["layers"].values()):
    layout = ("per growth event" if spec["format"] < 3 else
              "packed per layer with a mask of depths over all slots")
    raise ValueError(
        f"this checkpoint stores its units {layout} (architecture format {spec['format']}), "
        f"this version lists each depth's slots (format {FORMAT_VERSION}): resume or export it "
        "with the release that wrote it")
  return {"format": FORMAT_VERSION, "layers": {
      path: {"d_in": layer["d_in"], "d_out": layer["d_out"], "units": {}, "slots": {},
             "room": {}}
      for path, layer in spec["layers"].items()}}


def abstract_variables(spec: dict, base):
  """The abstract variables of the grown model: `base` (abstract variables of the ungrown
  model) plus each layer's unit packs. Checks that the base widths agree with the spec."""
  kernels = _layer_kernels(base["params"])
  params = traverse_util.flatten_dict(base["params"], sep="/")
  for path, layer in spec["layers"].items():
    if kernels.get(path) != (layer["d_in"], layer["d_out"]):
      model = "none" if path not in kernels else "{}x{}".format(*kernels[path])
      raise ValueError(f"spec.abstract_variables: the spec's layer {path!r} is "
                       f"{layer['d_in']}x{layer['d_out']} but the model's is {model}: the spec "
                       "(and its checkpoint) belongs to another architecture")
  if extra := sorted(kernels.keys() - spec["layers"].keys()):
    raise ValueError(f"spec.abstract_variables: the model's layers {extra} are not in the spec: "
                     "the spec (and its checkpoint) belongs to another architecture")
  return layers.set_packs(base, {
      path: {kind: layers.abstract_pack(kind, layer["room"].get(kind, per_depth),
                                        layer["slots"][kind], layer["d_in"],
                                        params[f"{path}/kernel"].dtype, kind in layer["room"])
             for kind, per_depth in layer["units"].items()}
      for path, layer in spec["layers"].items() if layer["units"]})


def layer_units(layer: dict) -> int:
  """Units on one layer of a spec, of every kind."""
  return sum(sum(per_depth) for per_depth in layer["units"].values())


def num_units(spec: dict) -> int:
  """Units in the model."""
  return sum(layer_units(layer) for layer in spec["layers"].values())


def unit_params(spec: dict) -> int:
  """Parameters held by units (layers.unit_param_count of each)."""
  return sum(sum(per_depth) * layers.unit_param_count(kind, layer["d_in"])
             for layer in spec["layers"].values() for kind, per_depth in layer["units"].items())


def describe(spec: dict) -> str:
  """One line per layer that grew: its units of each kind, at each depth."""
  lines = []
  for path, layer in spec["layers"].items():
    for kind, per_depth in layer["units"].items():
      if not sum(per_depth):  # slots reserved for events that did not use them
        continue
      lines.append(f"{path:<28} {layer['d_in']:>5}->{layer['d_out']:<5} {sum(per_depth):>5} "
                   f"{kind} units on {layer['d_out']} neurons, per depth {per_depth} "
                   f"({layer['slots'][kind]} slots)")
  return "\n".join(lines) if lines else "(no units)"
