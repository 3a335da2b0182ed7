"""Unit ablation: how much of a grown model's function its units carry.

A unit is switched off by zeroing its parameters (layers.switch_off_units), which for every
unit kind removes its contribution exactly, so the ablated model computes the ungrown
function of the trained base weights. The ablation compares the test metrics of the intact
and the ablated model, and gives each grown layer's mean |contribution| of its units: the mean
over test tokens of |y_j - z_j| over the neurons that carry units, with z_j the neuron's
output without its units (sown by GrowableDense into layers.CONTRIBUTION).

    result = unit_ablation(evaluate, contributions, variables, intact=last_eval)
    print(describe(result))
"""

from collections.abc import Callable

from flax import traverse_util
import numpy as np

from hetscale_jax import layers


def mean_contributions(sown, variables) -> dict[str, float]:
  """{path: mean |contribution| over the layer's grown neurons} from the sown intermediates
  ({..., layer path..., "unit_contribution": ([d_out],)}) of one apply."""
  grown = layers.grown_layers(variables)
  out = {}
  for key, (per_neuron,) in traverse_util.flatten_dict(sown, sep="/").items():
    path = key.rsplit("/", 1)[0]
    neurons = np.unique(np.concatenate([np.asarray(p.index)[np.asarray(p.live)]
                                        for p in grown[path].values()]))
    if not neurons.size:  # slots reserved for later events, none used
      continue
    out[path] = float(np.mean(np.asarray(per_neuron)[neurons]))
  return dict(sorted(out.items()))


def unit_ablation(evaluate: Callable[[dict], dict], contributions: Callable[[dict], dict],
                  variables, intact: dict) -> dict:
  """{"intact", "units_off": {"loss", "top1"}, "contribution": {path: mean |contribution|}}.

  evaluate(variables) -> test metrics {"loss", "top1", ...}; contributions(variables) -> the
  sown intermediates of one test batch; `intact` are the intact model's test metrics.
  """
  off = evaluate(layers.switch_off_units(variables))
  keep = lambda metrics: {"loss": metrics["loss"], "top1": metrics["top1"]}
  return {"intact": keep(intact), "units_off": keep(off),
          "contribution": mean_contributions(contributions(variables), variables)}


def describe(result: dict) -> str:
  """The ablation as printed at the end of a run."""
  intact, off = result["intact"], result["units_off"]
  lines = [f"unit ablation (every unit switched off): top-1 {intact['top1']:.2%} -> "
           f"{off['top1']:.2%}, test loss {intact['loss']:.4f} -> {off['loss']:.4f}",
           "  mean |unit contribution| per grown layer (test tokens, grown neurons):"]
  lines += [f"  {path:<28}{value:10.4g}" for path, value in result["contribution"].items()]
  return "\n".join(lines)
