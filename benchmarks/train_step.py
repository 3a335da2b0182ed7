r"""Train-step time: what GrowableDense and grown units cost, as ratios measured in one process.

  python benchmarks/train_step.py [--config configs/default.py] [--steps 20] [--rounds 7]
  python benchmarks/train_step.py --config configs/deit_s_cifar100.py --config.batch_size=8 \
      --config.model.dtype=float32 --steps 2 --rounds 3     # DeiT-S shapes, CPU-sized batch
  python benchmarks/train_step.py --reserve_events 2        # after the 1st of 3 events
  python benchmarks/train_step.py --schedule_slots          # ... with growth.slots "schedule"
  python benchmarks/train_step.py --config configs/study_mnist5k.py \
      --grown_from workdirs/study/splitting/seed0            # a trained run's grown model

Four models of the config, each trained with train.py's own step (AdamW, mixing, drop-path
as configured) on one fixed synthetic batch, compiled as training compiles them:

  dense      the DeiT with every GrowableDense replaced by flax's nn.Dense
  growable   the DeiT as the project builds it, from GrowableDense, no units
  grown      growable with one unit on 10% of the neurons of every qkv, proj, fc1 and fc2, its
             packs holding slots for --reserve_events more events (grow.grow's reserve; a
             training run sized at events reserves none), or with --schedule_slots the slots
             of all the config's events (growth.slots "schedule"); or, with --grown_from, the
             units and parameters of a run's latest checkpoint
  static     growable with its MLP widened to the grown model's parameter count

Ratios (targets): growable / dense (<= 1.03), grown / static (<= 1.15). The models are timed in
turn, `steps` steps each, over `rounds` rounds (after one warm-up round); a ratio is the
median of the per-round ratios.
"""

import os
from unittest import mock

from absl import app
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags
import numpy as np

import common
from hetscale_jax import checkpoint, grow, growth_event, spec, train
from hetscale_jax.layers import GrowableDense
from hetscale_jax.models import deit

config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "default.py"),
    "Training config of the model.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per model per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds.")
_GROWN_FRACTION = flags.DEFINE_float("grown_fraction", 0.1, "Share of neurons given a unit.")
_RESERVE_EVENTS = flags.DEFINE_integer(
    "reserve_events", 0, "Events still to come, whose slots and depths the grown packs hold.")
_SCHEDULE_SLOTS = flags.DEFINE_bool(
    "schedule_slots", False, "The grown model holds the slots of the config's whole schedule.")
_GROWN_FROM = flags.DEFINE_string(
    "grown_from", None, "A workdir of --config: its latest checkpoint is the grown model.")


class PlainDense(nn.Dense):
  """flax's nn.Dense, taking GrowableDense's extra argument (ignored) so DeiT can build it."""
  unit_activation: str = "gelu"


def apply_and_list_layers(model, variables, images):
  """(logits, class names of the dense layers the model ran): shows which class was built."""
  seen = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, GrowableDense)):
      seen.add(type(context.module).__name__)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    return model.apply(variables, images), seen


def ten_percent_plan(spectrum: dict, fraction: float, seed: int) -> grow.Plan:
  """`fraction` of every eligible layer's neurons, chosen at random."""
  rng = np.random.default_rng(seed)
  indices = {p: np.sort(rng.choice(s.eigvals.shape[0], round(fraction * s.eigvals.shape[0]),
                                   replace=False)).astype(np.int32)
             for p, s in spectrum.items()}
  return grow.Plan(indices=indices, direction="eigvec", rule="random", unit="gated",
                   num_params=grow.plan_params(indices, "gated", spectrum))


def widened_mlp(config, info, target: int) -> int:
  """mlp_dim (the same in every block) whose model is closest to `target` parameters. The count
  is linear in mlp_dim, so two evaluations fix it."""
  sizes = train.model_sizes(config, info)
  count = lambda mlp_dim: deit.param_count(config.model.variant, **{**sizes, "mlp_dim": mlp_dim})
  base = deit.architecture(config.model.variant, **{
      k: v for k, v in sizes.items() if k in deit.OVERRIDES})["mlp_dim"][0]
  per_unit = count(base + 1) - count(base)
  return base + round((target - count(base)) / per_unit)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = common.with_slots(flags.FLAGS.config, "events")  # dense, growable, static: no slots
  if not isinstance(config.model.mlp_dim, (int, type(None))):
    raise app.UsageError("the static model widens one mlp_dim for all blocks: give an int")
  print(common.machine())
  info = common.dataset_info(config)
  batch = common.synthetic_batch(config, info)
  config_file = os.path.relpath(flags.FLAGS["config"].config_filename)
  print(f"config {config_file}: DeiT-{config.model.variant} on "
        f"{info.name}-shaped inputs {tuple(info.image_shape)}, batch {config.batch_size}, "
        f"dtype {config.model.dtype}; {_STEPS.value} steps x {_ROUNDS.value} rounds per model")

  growable = common.Trainer(config, info)
  growable_state = growable.init_state()
  with mock.patch.object(deit, "GrowableDense", PlainDense):
    dense = common.Trainer(config, info)
    dense_state = dense.init_state()
    dense_compiled = dense.compile(dense_state, batch)
    # The same parameters and the same function: only the layer class differs.
    assert jax.tree.structure(dense_state.params) == jax.tree.structure(growable_state.params)
    dense_state = dense_state.replace(params=growable_state.params)
    images = batch["image"][:2]
    dense_logits, dense_layers = apply_and_list_layers(dense.model, dense_state.variables, images)
  logits, layers = apply_and_list_layers(growable.model, growable_state.variables, images)
  assert dense_layers == {"PlainDense", "Dense"} and layers == {"GrowableDense", "Dense"}, (
      dense_layers, layers)  # the head is nn.Dense in both
  print(f"  nn.Dense and GrowableDense models: max |logit difference| "
        f"{np.max(np.abs(dense_logits - logits)):.1e}")

  if _GROWN_FROM.value:
    grown_state = common.with_variables(
        growable, growable_state, checkpoint.read_latest(_GROWN_FROM.value).variables)
    grown_what = f"the latest checkpoint of {_GROWN_FROM.value}"
  else:
    spectrum = common.random_spectrum(growable_state.variables, config.growth.layers, seed=0)
    plan = ten_percent_plan(spectrum, _GROWN_FRACTION.value, seed=0)
    grown_state = growable_state
    if _SCHEDULE_SLOTS.value:
      grown_state = common.with_variables(growable, grown_state, growth_event.scheduled_slots(
          common.with_slots(config, "schedule"), grown_state.variables))
    grown_state = common.grow_state(growable, grown_state, plan, spectrum, _RESERVE_EVENTS.value)
    grown_what = f"{_GROWN_FRACTION.value:.0%} of neurons grown"
  grown_params = spec.count_params(grown_state.variables)
  static_config = config.copy_and_resolve_references()
  static_config.model.mlp_dim = widened_mlp(config, info, grown_params)
  static = common.Trainer(static_config, info)
  static_state = static.init_state()

  candidates = {}
  for name, trainer, state in (("dense", dense, dense_state),
                               ("growable", growable, growable_state),
                               ("grown", growable, grown_state), ("static", static, static_state)):
    compiled = dense_compiled if name == "dense" else trainer.compile(state, batch)
    candidates[name] = (compiled, *trainer.place(state, compiled, batch))
    print(f"  {name:<9} {spec.count_params(state.variables):>12,} params, compiled in "
          f"{compiled.seconds:.1f}s")
  costs = {n: candidates[n][0].fn.cost_analysis() for n in ("dense", "growable")}
  print("  XLA's cost analysis of the dense / growable steps: " + ", ".join(
      f"{key} {costs['dense'].get(key, 0):,.0f} / {costs['growable'].get(key, 0):,.0f}"
      for key in ("flops", "bytes accessed")))
  architecture = spec.from_variables(grown_state.variables)
  slots = sum(sum(layer["slots"].values()) for layer in architecture["layers"].values())
  print(f"  grown: {spec.num_units(architecture)} units in {slots} slots "
        f"(events reserved: {'the schedule' if _SCHEDULE_SLOTS.value else _RESERVE_EVENTS.value});"
        f" static: mlp_dim widened to "
        f"{static_config.model.mlp_dim}")

  times = common.interleaved_times(candidates, _STEPS.value, _ROUNDS.value)
  print(common.ratio_line("GrowableDense without units / nn.Dense", times, "growable", "dense",
                          1.03))
  print(common.ratio_line(f"{grown_what} / static of equal params", times, "grown", "static",
                          1.15))


if __name__ == "__main__":
  app.run(main)
