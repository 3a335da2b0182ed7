r"""Recompilation seconds per growth event, with and without JAX's persistent compilation cache.

  python benchmarks/recompile.py [--config configs/default.py] [--events 9]

Fresh processes grow the config's model through its growth events (or --events events spread
over the same epochs; each event's budget, unit kind and slots as train.py gives them, random
neurons from a seeded key) and time what training compiles at the start and after each event:
the train step (train.compile_train_step) and the eval step; 0 where the event's units fit the
slots reserved before, and the program compiled then is reused.

  1. no persistent cache, seed 0
  2. persistent cache, empty at the start (cold), seed 0: compiles, and writes what it compiled
  3. the cache as 2 left it (warm), seed 0: what a resumed or repeated run pays
  4. the same warm cache, seed 1: another seed or rule of the config, which picks other
     neurons; it is served where its unit capacities (layers.capacity) match the first run's

Reported: the recompile after the last event over the first compile (1), and the compile
seconds of 3 and 4 over those of 2. The cache holds every program, as in training
(train.use_compilation_cache).
The splitting spectrum's own compilation is not counted here (benchmarks/splitting_cost.py).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

import common
from hetscale_jax import grow, growth_event, spec, train

config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "default.py"),
    "Training config: model, batch size and growth schedule.", lock_config=True)
_EVENTS = flags.DEFINE_integer("events", None, "Growth events, spread evenly over the config's "
                                "first and last growth epochs (default: the config's).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Internal: one measuring process's cache "
                                 "dir ('' for none). Without it, this script runs the four.")
_SEED = flags.DEFINE_integer("seed", 0, "Internal: the seed of the neurons one process picks.")


def with_events(config, events: int | None):
  """The config with `events` growth events evenly over its growth epochs' span."""
  if events is None:
    return config
  config = config.copy_and_resolve_references()
  first, last = config.growth.epochs[0], config.growth.epochs[-1]
  config.growth.epochs = tuple(float(e) for e in np.linspace(first, last, events))
  return config


def measure(config, seed: int) -> list[dict]:
  """[{"event", "params", "train_step_s", "eval_step_s"}] at the start and after each event."""
  info = common.dataset_info(config)
  batch = common.synthetic_batch(config, info)
  trainer = common.Trainer(config, info)
  eval_step = train.make_eval_step(trainer.model, config)
  eval_batch = {**batch, "mask": np.ones(config.batch_size, np.float32)}
  state = trainer.init_state()
  g = config.growth
  num_events = len(g.epochs)
  rows = []
  for event in range(num_events + 1):
    if event:
      params = spec.count_params(state.variables)
      spectrum = common.random_spectrum(state.variables, g.layers, seed=event)
      plan = grow.select(spectrum,
                         budget=growth_event.event_budget(g, params, [1.0] * (num_events - event + 1)),
                         rule="random", unit=g.unit, max_layer_fraction=g.max_layer_fraction,
                         rng=jax.random.fold_in(jax.random.key(seed), event))
      state = common.grow_state(trainer, state, plan, spectrum)
    compiled = trainer.compile(state, batch)
    start = time.perf_counter()
    eval_step.lower(state.variables, eval_batch).compile()
    rows.append({"event": event, "params": spec.count_params(state.variables),
                 "train_step_s": compiled.seconds, "eval_step_s": time.perf_counter() - start})
  return rows


def run_measurement(cache_dir: str, seed: int = 0) -> list[dict]:
  """`measure` in a fresh process (a cache is read only by processes started after it)."""
  argv = [sys.executable, __file__, *sys.argv[1:], f"--cache_dir={cache_dir}", f"--seed={seed}"]
  out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = with_events(flags.FLAGS.config, _EVENTS.value)
  if _CACHE_DIR.value is not None:
    train.use_compilation_cache(_CACHE_DIR.value)
    print(json.dumps(measure(config, _SEED.value)))
    return
  if not config.growth.enabled:
    raise app.UsageError("the config has no growth events")
  print(common.machine())
  config_file = os.path.relpath(flags.FLAGS["config"].config_filename)
  print(f"config {config_file}: DeiT-{config.model.variant}, batch "
        f"{config.batch_size}, growth events at epochs {tuple(config.growth.epochs)}")
  with tempfile.TemporaryDirectory() as cache:
    results = {"no cache": run_measurement(""), "cold cache": run_measurement(cache),
               "warm cache": run_measurement(cache), "warm, seed 1": run_measurement(cache, seed=1)}
  print(f"{'':>10}{'params':>10}" + "".join(f"{m + ' train/eval s':>26}" for m in results))
  for k, row in enumerate(results["no cache"]):
    label = "start" if k == 0 else f"event {k}"
    print(f"{label:>10}{row['params']:>10,}" + "".join(
        f"{r[k]['train_step_s']:>16.2f}{r[k]['eval_step_s']:>10.2f}" for r in results.values()))
  seconds = {m: [r["train_step_s"] + r["eval_step_s"] for r in rows] for m, rows in results.items()}
  print(f"recompile after the last event / first compile (train + eval step, no cache): "
        f"{seconds['no cache'][-1] / seconds['no cache'][0]:.2f}x (target <= 1.3x)")
  cold = sum(seconds["cold cache"])
  print("compile seconds of the whole run with a warm cache / cold: "
        + ", ".join(f"{m} {sum(seconds[m]) / cold:.2f}x" for m in ("warm cache", "warm, seed 1"))
        + " (target for another seed or rule <= 0.2x)")


if __name__ == "__main__":
  app.run(main)
