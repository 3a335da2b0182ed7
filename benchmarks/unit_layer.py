r"""One grown layer against a dense layer of equal parameters: where a unit's cost goes.

  python benchmarks/unit_layer.py [--rounds 40]

A reduced DeiT-S fc1 (384 -> 768) on 1,576 tokens (batch 8 at 224 px) holding 400 gated units
stacked as the paper schedule's splitting end state stacks them (per depth 172, 114, 66, 31,
12, 4, 1: the end state's shares of its 19,785 units), against GrowableDense(768 + 400) with
no units, the width a static model would spend the same parameters on. Timed, interleaved in
one process: the forward pass and the gradient of a scalar of the output in parameters and
input, with the unit's activation s as configured (exact-erf GELU, the default) and with
stand-ins that keep the layout and change only s's arithmetic: the tanh GELU and s(v) = v^2
(not a unit anyone should train; it prices the layout alone). Printed: milliseconds and the
ratio against the dense layer of equal parameters, and XLA's working memory of each program.
"""

import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
from hetscale_jax import layers

D_IN, D_OUT, TOKENS = 384, 768, 1576
UNITS_PER_DEPTH = (172, 114, 66, 31, 12, 4, 1)
# The unit activations compared; "square" is registered here only, as a price of the layout.
ACTIVATIONS = ("gelu", "gelu_tanh", "square")

_ROUNDS = flags.DEFINE_integer("rounds", 40, "Timed rounds (medians are printed).")


class OneLayer(nn.Module):
  features: int
  unit_activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    return layers.GrowableDense(self.features, unit_activation=self.unit_activation,
                                name="layer")(x)


def grown_variables(rng: np.random.Generator):
  """The layer's variables with UNITS_PER_DEPTH gated units: depth d on neurons 0 .. n_d - 1,
  so that each sits on the units below it."""
  variables = {"params": {"layer": {
      "kernel": jnp.asarray(rng.normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN), jnp.float32),
      "bias": jnp.zeros(D_OUT, jnp.float32)}}}
  for n in UNITS_PER_DEPTH:
    variables = layers.add_unit_packs(variables, {"layer": layers.NewUnits("gated", np.arange(n), {
        "r": rng.normal(size=(n, D_IN + 1)) / np.sqrt(D_IN), "a": rng.normal(size=n)})})
  return variables


def programs(model, variables, x) -> dict:
  """{"forward", "train"}: (jitted function, XLA working memory in bytes)."""
  others = {k: v for k, v in variables.items() if k != "params"}
  loss = lambda params, x: jnp.sum(jnp.sin(model.apply({**others, "params": params}, x)))
  fns = {"forward": jax.jit(lambda params, x: model.apply({**others, "params": params}, x)),
         "train": jax.jit(jax.grad(loss, argnums=(0, 1)))}
  return {name: (fn, fn.lower(variables["params"], x).compile().memory_analysis()
                 .temp_size_in_bytes) for name, fn in fns.items()}


def main(argv):
  del argv
  print(common.machine())
  layers.ACTIVATIONS.setdefault("square", lambda v: v * v)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(TOKENS, D_IN)), jnp.float32)
  grown = grown_variables(rng)
  dense = OneLayer(D_OUT + sum(UNITS_PER_DEPTH))
  candidates = {"dense": (dense, dense.init(jax.random.key(0), x))}
  for activation in ACTIVATIONS:
    candidates[activation] = (OneLayer(D_OUT, activation), grown)
  compiled = {name: programs(model, variables, x)
              for name, (model, variables) in candidates.items()}
  for step in ("forward", "train"):
    times = {name: [] for name in candidates}
    for r in range(_ROUNDS.value + 1):
      for name, (_, variables) in candidates.items():
        fn = compiled[name][step][0]
        start = time.perf_counter()
        jax.block_until_ready(fn(variables["params"], x))
        if r:
          times[name].append(time.perf_counter() - start)
    dense_ms = statistics.median(times["dense"]) * 1e3
    print(f"{step}: dense of equal parameters {dense_ms:.1f} ms, working memory "
          f"{compiled['dense'][step][1] / 2**20:.1f} MiB")
    for activation in ACTIVATIONS:
      ratio = statistics.median([a / b for a, b in zip(times[activation], times["dense"])])
      print(f"  units with s = {activation:<9} {statistics.median(times[activation]) * 1e3:6.1f}"
            f" ms, {ratio:.2f}x; working memory {compiled[activation][step][1] / 2**20:.1f} MiB")


if __name__ == "__main__":
  app.run(main)
