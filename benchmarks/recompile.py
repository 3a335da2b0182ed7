r"""Recompilation seconds per growth event, with and without JAX's persistent compilation cache.

  python benchmarks/recompile.py [--config configs/default.py]

Three fresh processes grow the config's model through the config's growth events (each event's
budget as train.py computes it, random neurons with fixed seeds, so every process builds the
same programs) and time what training compiles at the start and after each event: the train
step (train.compile_train_step) and the eval step.

  1. no persistent cache
  2. persistent cache, empty at the start (cold): compiles, and writes what it compiled
  3. persistent cache as 2 left it (warm): what a resumed or repeated run pays

JAX caches only programs whose compilation took at least
jax_persistent_cache_min_compile_time_secs (1 s by default); faster ones are compiled anew.
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
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Internal: one measuring process's cache "
                                 "dir ('' for none). Without it, this script runs the three.")


def measure(config) -> list[dict]:
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
      params = spec.count_params(state.params)
      spectrum = common.random_spectrum(state.variables, g.layers, seed=event)
      plan = grow.select(spectrum, growth_event.event_budget(g, params, [1.0] * (num_events - event + 1)),
                         rule="random", max_layer_fraction=g.max_layer_fraction,
                         rng=jax.random.key(event))
      state = common.grow_state(trainer, state, plan, spectrum)
    compiled = trainer.compile(state, batch)
    start = time.perf_counter()
    eval_step.lower(state.variables, eval_batch).compile()
    rows.append({"event": event, "params": spec.count_params(state.params),
                 "train_step_s": compiled.seconds, "eval_step_s": time.perf_counter() - start})
  return rows


def run_measurement(cache_dir: str) -> list[dict]:
  """`measure` in a fresh process (a cache is read only by processes started after it)."""
  argv = [sys.executable, __file__, *sys.argv[1:], f"--cache_dir={cache_dir}"]
  out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = flags.FLAGS.config
  if _CACHE_DIR.value is not None:
    if _CACHE_DIR.value:
      jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
    print(json.dumps(measure(config)))
    return
  if not config.growth.enabled:
    raise app.UsageError("the config has no growth events")
  print(common.machine())
  config_file = os.path.relpath(flags.FLAGS["config"].config_filename)
  print(f"config {config_file}: DeiT-{config.model.variant}, batch "
        f"{config.batch_size}, growth events at epochs {tuple(config.growth.epochs)}; "
        f"persistent cache threshold {jax.config.jax_persistent_cache_min_compile_time_secs} s")
  with tempfile.TemporaryDirectory() as cache:
    results = {"no cache": run_measurement(""), "cold cache": run_measurement(cache),
               "warm cache": run_measurement(cache)}
  print(f"{'':>10}{'params':>10}" + "".join(f"{m + ' train/eval s':>26}" for m in results))
  for k, row in enumerate(results["no cache"]):
    label = "start" if k == 0 else f"event {k}"
    print(f"{label:>10}{row['params']:>10,}" + "".join(
        f"{r[k]['train_step_s']:>16.2f}{r[k]['eval_step_s']:>10.2f}" for r in results.values()))
  events = slice(1, None)
  mean = {m: np.mean([r["train_step_s"] + r["eval_step_s"] for r in rows[events]])
          for m, rows in results.items()}
  print("recompile seconds per growth event (train + eval step, mean over events): "
        + ", ".join(f"{m} {s:.2f}" for m, s in mean.items())
        + f"; warm / no cache {mean['warm cache'] / mean['no cache']:.3f}x")


if __name__ == "__main__":
  app.run(main)
