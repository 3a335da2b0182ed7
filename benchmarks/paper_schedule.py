r"""The paper's schedule, grown end states against the static models: train and eval step time,
XLA's flops and working memory, and how the units are laid out.

  python benchmarks/paper_schedule.py [--batch 8] [--rounds 3] [--probe_image_size 224] \
      [--plans /tmp/paper_plans.json]

configs/deit_s_in100.py's two grown variants, `splitting` (gated units, global allocation) and
`authors` (linear units, by_kind quotas), are grown through the config's 9 events by its own
growth step (growth_event.grow_state: the spectrum, the lr-weighted budgets, select, grow),
from the reduced DeiT-S, with no training between events. The probe is a synthetic batch per
event at --probe_image_size (a smaller size keeps the spectra cheap on a CPU; the units sit on
dense layers whose shapes do not depend on it). The picks are written to --plans; a later run
given the file replays them (grow_state again, with the recorded plan in place of the
spectrum's), so that two versions of the code time the same end state.

Then, at the config's 224 px, batch --batch, float32, the train and eval steps of the two end
states and of static_reduced, static_uniform and static_full are timed in turn, --rounds
rounds after a warm-up round (one step each); a ratio is the median of per-round ratios.
Printed per model: parameters, XLA's flops and temporary ("working") memory of the compiled
train step; per grown model: units, slots allocated, and the units at each depth.

XLA:CPU's default scheduler orders a program for concurrency and computes work as soon as its
inputs exist: what remat meant to recompute in the backward pass (XLA:CPU drops remat's
barriers) can then be computed in the forward pass and held until the backward pass reads it.
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false measures the same programs
under its memory-minimizing scheduler (BENCHMARKS.md reports both).
"""

import collections
import json
import os
import statistics
import time
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common
from hetscale_jax import grow, growth_event, spec, splitting, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "deit_s_in100.py")
GROWN = ("splitting", "authors")
STATIC = ("static_reduced", "static_uniform", "static_full")

_BATCH = flags.DEFINE_integer("batch", 8, "Batch size of the timed steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds.")
_PROBE_SIZE = flags.DEFINE_integer("probe_image_size", 224,
                                   "Image size of the growth events' probe batches.")
_PLANS = flags.DEFINE_string("plans", None, "JSON of the events' picks: replayed if it exists, "
                             "written after the build otherwise.")


def load_config(variant: str, image_size: int, batch: int):
  module = {}
  with open(CONFIG) as f:
    exec(compile(f.read(), CONFIG, "exec"), module)  # pylint: disable=exec-used
  config = module["get_config"](variant)
  config.data.image_size = image_size
  config.batch_size = batch
  config.model.dtype = "float32"
  return config


def build(variant: str, image_size: int, recorded: list | None):
  """(Trainer at the config's image size, end state, picks per event): grown through the
  config's events by growth_event.grow_state, on `image_size` probes; with `recorded` picks,
  those replace the spectrum's."""
  probe_config = load_config(variant, image_size, _BATCH.value)
  info = common.dataset_info(probe_config)
  trainer = common.Trainer(probe_config, info)
  state = trainer.init_state()
  events = growth_event.event_steps(probe_config, steps_per_epoch=100)
  weights = train.event_weights(probe_config, train.learning_rate_schedule(probe_config, 100),
                                events)
  picks = []
  for i, step in enumerate(events):
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    batches = [common.synthetic_batch(probe_config, info, seed=100 * i + k)
               for k in range(probe_config.growth.probe_batches)]
    patches = []
    if recorded is not None:
      plan = grow.Plan({p: np.asarray(n, np.int32) for p, n in recorded[i].items()}, "eigvec",
                       probe_config.growth.rule, probe_config.growth.unit, 0)
      patches = [mock.patch.object(growth_event, "event_spectrum",
                                   lambda _c, _l, v, *_: splitting.random_spectrum(
                                       v, 0, growth_event.eligible(tuple(_c.growth.layers)))),
                 mock.patch.object(grow, "select", lambda *_, **__: plan)]
    for patch in patches:
      patch.start()
    try:
      state, event = growth_event.grow_state(
          probe_config, trainer.model, trainer.tx, state, batches, weights_left=weights[i:],
          num_classes=info.num_classes, model_input=train.model_input(probe_config),
          peak_lr=train.peak_learning_rate(probe_config))
    finally:
      for patch in patches:
        patch.stop()
    picks.append({p: np.asarray(n).tolist() for p, n in event.plan.indices.items()})
    print(f"  {variant} event {i + 1}/{len(events)}: +{event.record['params_after'] - event.record['params_before']:,} "
          f"params, {event.record['seconds_spectrum']:.1f}s spectrum", flush=True)
  config = load_config(variant, 224, _BATCH.value)
  full = common.Trainer(config, common.dataset_info(config))
  base = full.init_state()
  grown = dict(state.variables)
  grown["params"] = {**jax.device_get(state.params)}
  grown["params"]["pos_embed"] = base.params["pos_embed"]  # the one shape the image size sets
  return full, common.with_variables(full, base, grown), picks


def layout(variables) -> str:
  architecture = spec.from_variables(variables)
  units = spec.num_units(architecture)
  slots = sum(sum(layer["slots"].values()) for layer in architecture["layers"].values())
  depths = collections.Counter()
  for layer in architecture["layers"].values():
    for per_depth in layer["units"].values():
      for d, n in enumerate(per_depth):
        depths[d] += n
  histogram = ", ".join(f"{d}: {depths[d]}" for d in sorted(depths))
  return (f"{units:,} units in {slots:,} slots ({units / max(slots, 1):.0%} live); units per "
          f"depth {{{histogram}}}")


def main(argv):
  del argv
  print(common.machine())
  recorded = {}
  if _PLANS.value and os.path.exists(_PLANS.value):
    with open(_PLANS.value) as f:
      recorded = json.load(f)
    print(f"replaying the picks of {_PLANS.value}")
  models, picks = {}, {}
  for variant in GROWN:
    start = time.perf_counter()
    trainer, state, picks[variant] = build(variant, _PROBE_SIZE.value, recorded.get(variant))
    models[variant] = (trainer, state)
    print(f"{variant}: grown in {time.perf_counter() - start:.0f}s; {layout(state.variables)}",
          flush=True)
  if _PLANS.value and not recorded:
    with open(_PLANS.value, "w") as f:
      json.dump(picks, f)
  # The events' programs (18 spectra when the picks are computed) are not needed again. XLA:CPU
  # maps each compiled program's code in thousands of pieces: with them held, compiling the
  # train steps below reached Linux's default limit of 65,530 maps ("Cannot allocate memory").
  jax.clear_caches()
  for variant in STATIC:
    config = load_config(variant, 224, _BATCH.value)
    trainer = common.Trainer(config, common.dataset_info(config))
    models[variant] = (trainer, trainer.init_state())

  batch = common.synthetic_batch(models["static_full"][0].config,
                                 models["static_full"][0].info)
  eval_batch = {**batch, "mask": np.ones(_BATCH.value, bool)}
  steps, memory = {}, {}
  for name, (trainer, state) in models.items():
    compiled = trainer.compile(state, batch)
    cost, mem = compiled.fn.cost_analysis(), compiled.fn.memory_analysis()
    memory[name] = mem.temp_size_in_bytes
    state, placed = trainer.place(state, compiled, batch)
    evaluate = train.make_eval_step(trainer.model, trainer.config)
    start = time.perf_counter()
    jax.block_until_ready(evaluate(state.variables, eval_batch))
    steps[name] = [compiled, state, placed, evaluate]
    print(f"  {name:<15} {spec.count_params(state.variables):>11,} params; train step compiled "
          f"in {compiled.seconds:.0f}s, eval in {time.perf_counter() - start:.0f}s; flops "
          f"{cost.get('flops', 0) / 1e9:,.0f} G; working memory {memory[name] / 2**20:,.0f} MiB",
          flush=True)

  train_times, eval_times = collections.defaultdict(list), collections.defaultdict(list)
  for r in range(_ROUNDS.value + 1):
    for name, entry in steps.items():
      compiled, state, placed, evaluate = entry
      start = time.perf_counter()
      state, metrics = compiled.fn(state, placed)  # donates the state it is given
      jax.block_until_ready((state, metrics))
      seconds = time.perf_counter() - start
      entry[1] = state
      _, eval_seconds = common.timed(evaluate, state.variables, eval_batch)
      if r:
        train_times[name].append(seconds)
        eval_times[name].append(eval_seconds)
  print(f"train / eval step seconds (median of {_ROUNDS.value} rounds): " + ", ".join(
      f"{n} {statistics.median(train_times[n]):.2f} / {statistics.median(eval_times[n]):.2f}"
      for n in steps))
  for name in GROWN:
    ratio = lambda times, base: statistics.median(
        [a / b for a, b in zip(times[name], times[base])])
    print(f"{name} end state: train / static_uniform {ratio(train_times, 'static_uniform'):.2f}x, "
          f"train / static_full {ratio(train_times, 'static_full'):.2f}x, train / static_reduced "
          f"{ratio(train_times, 'static_reduced'):.2f}x; eval / static_uniform "
          f"{ratio(eval_times, 'static_uniform'):.2f}x; working memory / static_uniform "
          f"{memory[name] / memory['static_uniform']:.2f}x")


if __name__ == "__main__":
  app.run(main)
