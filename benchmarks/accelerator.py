r"""The project's figures on one accelerator, in one command of about five minutes.

  python benchmarks/accelerator.py                  # DeiT-S, 224 px, bfloat16, on the accelerator
  python benchmarks/accelerator.py --small          # the same measurements, small model, CPU
  python benchmarks/accelerator.py --stages=step,loop --batch_per_device=128

The full run trains DeiT-S as configs/deit_s_in100.py:static_full builds it (224 px, patch 16,
100 classes, bfloat16 activations, AdamW, mixing and drop-path as configured) on synthetic
uint8 batches; --small the default config's DeiT (width 64, depth 4, 8x8 inputs, float32).
After the machine and the versions it prints one section per stage:

  step       train step: images/s, model FLOPs per step from XLA's cost analysis of the
             compiled step (and the usual 6 x params x tokens count as a cross-check), MFU
             against the device's peak bfloat16 rate (PEAK_BF16; n/a on a CPU). The batch is
             --batch_per_device on every device, halved while the device runs out of memory.
  grown      10% of every eligible layer's neurons given a unit vs a static model of equal
             parameters (MLP widened), as benchmarks/train_step.py builds them: time ratio.
  memory     peak device memory after the train steps (memory_stats; n/a where not kept).
  loop       train.train_and_evaluate on an in-memory synthetic dataset of the same shapes
             (growth off, evaluation and checkpoints past the end, logging every 50 steps)
             vs its own compiled step alone on one batch: overhead per step.
  spectrum   the full splitting spectrum in train-step gradients, benchmarks/splitting_cost.py's
             measurement (collected form; its naive method from one neuron per layer shape).
  recompile  train + eval compile seconds at the start and after each of four growth events,
             with a cold and then a warm persistent cache, benchmarks/recompile.py run in fresh
             processes (configs/deit_s_in100.py's four events; --small: configs/tiny_test.py's
             model, one block deep, with four events).

It ends with one line per target: measured, target, met / not met. A stage that fails (out of
memory, a missing cost analysis, ...) prints its error and the next one runs; the exit status
is 0.
"""

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from unittest import mock

import jax
import numpy as np

import common
import splitting_cost
import train_step
from hetscale_jax import input_pipeline, spec, train, writers
from hetscale_jax.models import deit

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
STAGES = ("step", "grown", "memory", "loop", "spectrum", "recompile")

# Dense bfloat16 peak FLOP/s of one chip, by a lower-case substring of jax's device_kind; the
# first match counts, so the more specific names come first ("TPU v5 lite" is a v5e).
PEAK_BF16 = (("h100 pcie", 756e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
             ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12),
             ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12))

TARGETS = {"grown": 1.10, "spectrum": 12.0, "recompile": 2.0, "loop": 0.02}
GROWN_FRACTION = 0.1
LOG_EVERY = 50


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="small model, small batch: minutes on a 2-core CPU")
  parser.add_argument("--stages", default=",".join(STAGES),
                      help="comma-separated, of " + ", ".join(STAGES))
  parser.add_argument("--batch_per_device", type=int, help="default 256; --small: 32")
  parser.add_argument("--steps", type=int, help="timed steps per round (default 20; --small: 10)")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after a warm-up round")
  parser.add_argument("--loop_steps", type=int, default=300,
                      help="steps of the training loop, logged every 50")
  parser.add_argument("--spectrum", help="variant,img_size,patch_size,probe_batch of the spectrum "
                      "stage (default S,32,8,64 as splitting_cost.py; --small: Ti,32,8,4)")
  parser.add_argument("--recompile_timeout", type=int, default=300,
                      help="seconds each recompile.py process may take")
  args = parser.parse_args()
  args.stages = args.stages.split(",")
  if unknown := set(args.stages) - set(STAGES):
    parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
  args.batch_per_device = args.batch_per_device or (32 if args.small else 256)
  args.steps = args.steps or (10 if args.small else 20)
  variant, *sizes = (args.spectrum or ("Ti,32,8,4" if args.small else "S,32,8,64")).split(",")
  args.spectrum = (variant, *map(int, sizes))
  return args


def load_config(name: str, *args):
  """get_config(*args) of configs/<name>."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def with_batch(config, batch_size: int):
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  return config


def describe(config, info) -> str:
  m = config.model
  return (f"DeiT-{m.variant} (width {m.width or deit.VARIANTS[m.variant]['width']}, depth "
          f"{m.depth or deit.VARIANTS[m.variant]['depth']}) on {info.name}-shaped inputs "
          f"{tuple(info.image_shape)}, patch {m.patch_size}, {info.num_classes} classes, "
          f"{m.dtype} activations, batch {config.batch_size} ({jax.device_count()} device(s))")


# ---------------------------------------------------------------------------- stage running

def run_stage(title: str, fn):
  """fn()'s value, or None after printing its error: one failing stage leaves the others."""
  print(f"\n== {title}", flush=True)
  start = time.perf_counter()
  try:
    return fn()
  except Exception as e:  # whatever the stage raised: report it, run the others
    lines = traceback.format_exception(e, limit=-3)
    print("  FAILED: " + "".join(lines)[-3000:].replace("\n", "\n  "))
    return None
  finally:
    gc.collect()  # device buffers the failure left reachable from its traceback
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def halving_batch(measure, config, info):
  """(measure(config, info), the config it ran at), halving the batch on out-of-memory until
  each device would get a single example."""
  devices = jax.device_count()
  while True:
    try:
      return measure(config, info), config
    except Exception as e:  # XLA's out-of-memory error has no class of its own
      per_device = config.batch_size // devices // 2
      if not out_of_memory(e) or per_device < 1:
        raise
    gc.collect()  # outside the except clause, whose traceback holds the failed attempt's arrays
    print(f"  out of memory at batch {config.batch_size}: halving", flush=True)
    config = with_batch(config, per_device * devices)


# ---------------------------------------------------------------------------- step and MFU

def xla_flops(compiled) -> float:
  """FLOPs of one step on one device, by XLA's cost analysis of the compiled program (which
  is the partitioned, per-device one). Older jax versions return one dict per program, newer
  ones a dict."""
  analysis = compiled.fn.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops", 0.0)
  if flops <= 0:
    raise ValueError(f"XLA's cost analysis has no FLOPs: {analysis!r:.200}")
  return float(flops)


def counted_flops(config, info) -> float:
  """Training FLOPs per image by the usual count: 6 per parameter per token, plus attention's
  two token-by-token products. XLA's figure can leave out library calls; this cannot."""
  sizes = train.model_sizes(config, info)
  arch = deit.architecture(config.model.variant,
                           **{k: v for k, v in sizes.items() if k in deit.OVERRIDES})
  tokens = (sizes["img_size"] // arch["patch_size"]) ** 2 + 1
  attention = sum(12 * tokens ** 2 * arch["num_heads"] * h for h in arch["head_dim"])
  return 6 * deit.param_count(config.model.variant, **sizes) * tokens + attention


def peak_rate() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def time_step(config, info, args) -> dict:
  trainer = common.Trainer(common.with_slots(config, "events"), info)
  state = trainer.init_state()
  batch = common.synthetic_batch(config, info)
  compiled = trainer.compile(state, batch)
  candidate = (compiled, *trainer.place(state, compiled, batch))
  seconds = statistics.median(
      common.interleaved_times({"step": candidate}, args.steps, args.rounds)["step"])
  try:
    flops = xla_flops(compiled)
  except Exception as e:  # a backend without cost analysis still has its images/s
    print(f"  XLA FLOPs unavailable ({type(e).__name__}: {e})")
    flops = None
  return {"seconds": seconds, "flops": flops, "compile": compiled.seconds,
          "params": spec.count_params(state.variables)}


def step_stage(config, info, args) -> dict:
  figures, config = halving_batch(lambda c, i: time_step(c, i, args), config, info)
  batch, seconds, flops = config.batch_size, figures["seconds"], figures["flops"]
  counted = counted_flops(config, info) * batch
  peak = peak_rate()
  print(f"  {describe(config, info)}: {figures['params']:,} params, compiled in "
        f"{figures['compile']:.1f}s")
  print(f"  {seconds * 1e3:.2f} ms/step (median of {args.rounds} rounds of {args.steps} steps) "
        f"= {batch / seconds:,.0f} images/s")
  devices = jax.device_count()
  xla = (f"XLA {flops / 1e9:,.4g} GFLOP/step per device ({flops * devices / batch / 1e9:.3g} "
         "GFLOP/image), " if flops else "")
  print(f"  model FLOPs: {xla}6 x params x tokens + attention {counted / 1e9:,.4g} GFLOP/step "
        f"({counted / batch / 1e9:.3g} GFLOP/image)")
  mfu = flops / seconds / peak if flops and peak else None
  if mfu is not None:
    print(f"  MFU: {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 peak per device (by the counted "
          f"FLOPs: {counted / seconds / (peak * devices):.1%})")
  else:
    print("  MFU: n/a (" + (f"no peak rate for {jax.devices()[0].device_kind!r})" if flops
                           else "no XLA FLOPs)"))
  return {"config": config, "images_per_s": batch / seconds, "mfu": mfu}


# ---------------------------------------------------------------------------- grown vs static

def time_grown(config, info, args) -> float:
  """Median over rounds of grown / static step time, printing train_step.py's ratio line."""
  config = common.with_slots(config, "events")
  trainer = common.Trainer(config, info)
  state = trainer.init_state()
  spectrum = common.random_spectrum(state.variables, config.growth.layers, seed=0)
  plan = train_step.ten_percent_plan(spectrum, GROWN_FRACTION, seed=0)
  grown = common.grow_state(trainer, state, plan, spectrum)
  static_config = config.copy_and_resolve_references()
  static_config.model.mlp_dim = train_step.widened_mlp(config, info, spec.count_params(grown.variables))
  static = common.Trainer(static_config, info)
  batch = common.synthetic_batch(config, info)
  candidates = {}
  for name, owner, model_state in (("grown", trainer, grown),
                                   ("static", static, static.init_state())):
    compiled = owner.compile(model_state, batch)
    candidates[name] = (compiled, *owner.place(model_state, compiled, batch))
    print(f"  {name:<7}{spec.count_params(model_state.variables):>12,} params, compiled in "
          f"{compiled.seconds:.1f}s", flush=True)
  del state, grown, model_state  # the candidates hold their own copies
  units = sum(len(i) for i in plan.indices.values())
  print(f"  grown: {units} units on {sum(s.eigvals.shape[0] for s in spectrum.values())} "
        f"neurons; static: mlp_dim widened to {static_config.model.mlp_dim}; batch "
        f"{config.batch_size}")
  times = common.interleaved_times(candidates, args.steps, args.rounds)
  print("  " + common.ratio_line(f"{GROWN_FRACTION:.0%} of neurons grown / static of equal "
                                 "params", times, "grown", "static", TARGETS["grown"]))
  return statistics.median(g / s for g, s in zip(times["grown"], times["static"]))


def grown_stage(config, info, args) -> float:
  ratio, _ = halving_batch(lambda c, i: time_grown(c, i, args), config, info)
  return ratio


# ---------------------------------------------------------------------------- memory

def memory_stage() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # backends without allocator statistics raise or return None
    stats = {}
  peak, limit = stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
  print("  peak device memory in use so far: " + (
      f"{peak / 2**30:.2f} GiB" + (f" of {limit / 2**30:.1f} GiB" if limit else "")
      if peak else "n/a (the device keeps no allocator statistics)"))
  return peak


# ---------------------------------------------------------------------------- the loop

def loop_config(config, loop_steps: int):
  """The config as the loop runs it here: no growth, no persistent cache (it would be set up
  in this process for every later compilation), evaluation and checkpoints past the end."""
  config = config.copy_and_resolve_references()
  config.growth.enabled = False
  config.compilation_cache_dir = ""
  config.log_every_steps = LOG_EVERY
  config.num_epochs = max(config.num_epochs, loop_steps // 100 + 1)
  config.eval_every_epochs = float(config.num_epochs)
  config.checkpoint_every_steps = 100 * config.num_epochs
  return config


def run_loop(config, info, loop_steps: int, pool: list, workdir: str) -> train.CompiledStep:
  """train_and_evaluate for loop_steps steps on `pool`'s batches in turn; returns the train
  step it compiled. 100 steps an epoch, as common.Trainer's schedule assumes."""
  data = dataclasses.replace(info, num_train=100 * config.batch_size, num_eval=config.batch_size)
  eval_batch = {**pool[0], "mask": np.ones(config.batch_size, np.float32)}
  compiled, compile_train_step = [], train.compile_train_step

  def record(*args):
    compiled.append(compile_train_step(*args))
    return compiled[-1]
  with mock.patch.object(input_pipeline, "dataset_info", return_value=data), \
       mock.patch.object(input_pipeline, "train_batches",
                         side_effect=lambda *a, **k: itertools.cycle(pool)), \
       mock.patch.object(input_pipeline, "eval_batches",
                         side_effect=lambda *a, **k: iter([eval_batch])), \
       mock.patch.object(train, "compile_train_step", side_effect=record):
    train.train_and_evaluate(config, workdir, stop_after_steps=loop_steps)
  return compiled[0]


def loop_seconds(workdir: str) -> list[float]:
  """Seconds per step between log steps, from clu's ReportProgress records in metrics.jsonl.

  Read from the loop's own metrics rather than timed around train_and_evaluate: those
  intervals hold every per-step cost (batch copies, dispatch, logging) and none of the
  once-per-run ones (compilation, the first steps, the checkpoint at the stop). The first
  interval is dropped: it starts right after the compilation.
  """
  records = [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if "steps_per_sec" in r]
  if len(records) < 2:
    raise RuntimeError(f"{len(records)} steps_per_sec records in metrics.jsonl; need 2 or more")
  return [1.0 / r["steps_per_sec"] for r in sorted(records, key=lambda r: r["step"])[1:]]


def loop_stage(config, info, args) -> float:
  config = loop_config(config, args.loop_steps)
  # Two batches in turn: every step copies a new host batch, as from the input pipeline.
  pool = [common.synthetic_batch(config, info, seed) for seed in range(2)]
  with tempfile.TemporaryDirectory() as workdir:
    compiled = run_loop(config, info, args.loop_steps, pool, workdir)
    in_loop = loop_seconds(workdir)
  trainer = common.Trainer(config, info)
  candidate = (compiled, *trainer.place(trainer.init_state(), compiled, pool[0]))
  alone = common.interleaved_times({"alone": candidate}, LOG_EVERY, args.rounds)["alone"]
  loop_s, alone_s = statistics.median(in_loop), statistics.median(alone)
  overhead = loop_s / alone_s - 1
  print(f"  {describe(config, info)}")
  print(f"  loop: {loop_s * 1e3:.2f} ms/step (median of {len(in_loop)} intervals of {LOG_EVERY} "
        f"steps, range {min(in_loop) * 1e3:.2f}-{max(in_loop) * 1e3:.2f}); step alone on one "
        f"batch already on the device: {alone_s * 1e3:.2f} ms/step (median of {len(alone)} "
        f"rounds, range {min(alone) * 1e3:.2f}-{max(alone) * 1e3:.2f})")
  print(f"  loop overhead: {overhead:+.1%} of a step")
  return overhead


# ---------------------------------------------------------------------------- spectrum

def spectrum_stage(args) -> float:
  """The collected spectrum's seconds in train-step gradients, by splitting_cost.py."""
  variant, img_size, patch_size, batch = args.spectrum
  naive = splitting_cost.naive_benchmark(variant, img_size, patch_size, batch, 1)
  result = splitting_cost.benchmark(variant, img_size, patch_size, batch, 1 if args.small else 2,
                                    naive, ["collected"])
  if "collected" not in result["methods"]:
    raise RuntimeError("the collected spectrum did not run (see above)")
  seconds, _ = result["methods"]["collected"]
  return seconds / result["grad_seconds"]


# ---------------------------------------------------------------------------- recompile

def recompile_argv(args, batch_size: int) -> list[str]:
  if args.small:  # one block: each process compiles for minutes on 2 cores even so
    return [f"--config={CONFIGS}/tiny_test.py", "--config.growth.epochs=(0.2,0.4,0.6,0.8)",
            "--config.model.depth=1", f"--config.batch_size={batch_size}"]
  return [f"--config={CONFIGS}/deit_s_in100.py", f"--config.batch_size={batch_size}"]


def recompile_rows(argv: list[str], cache_dir: str, timeout: int) -> list[dict]:
  """recompile.measure's rows, from recompile.py in a fresh process (a persistent cache is read
  only by processes started after it was written). No preallocation, so that it fits beside
  this process's memory pool on a GPU."""
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  done = subprocess.run([sys.executable, os.path.join(HERE, "recompile.py"), *argv,
                         f"--cache_dir={cache_dir}"], capture_output=True, text=True,
                        timeout=timeout, env=env)
  if done.returncode:
    raise RuntimeError(f"recompile.py exited with {done.returncode}:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure_recompile(args, batch_size: int) -> dict:
  with tempfile.TemporaryDirectory() as cache:
    return {name: recompile_rows(recompile_argv(args, batch_size), cache, args.recompile_timeout)
            for name in ("cold cache", "warm cache")}


def recompile_stage(results: dict) -> float:
  """Prints the compile seconds per event; returns the cold cache's last / first compile."""
  print(f"  {'':>9}{'params':>12}" + "".join(f"{m + ' train/eval s':>26}" for m in results))
  for rows in zip(*results.values()):
    label = f"event {rows[0]['event']}" if rows[0]["event"] else "start"
    print(f"  {label:>9}{rows[0]['params']:>12,}" + "".join(
        f"{r['train_step_s']:>16.2f}{r['eval_step_s']:>10.2f}" for r in rows))
  total = {m: [r["train_step_s"] + r["eval_step_s"] for r in rows] for m, rows in results.items()}
  cold, warm = total["cold cache"], total["warm cache"]
  print(f"  train + eval compile after event {len(cold) - 1} / at the start: cold cache "
        f"{cold[-1] / cold[0]:.2f}x, warm cache {warm[-1] / warm[0]:.2f}x; mean per event: cold "
        f"{statistics.mean(cold[1:]):.2f} s, warm {statistics.mean(warm[1:]):.2f} s")
  return cold[-1] / cold[0]


def outcome(fn):
  """fn() now, its value or its error given back when the stage is reported."""
  try:
    value = fn()
  except Exception as e:  # raised again when the stage is reported
    error = e  # `e` itself is unbound when the except clause ends

    def fail():
      raise error
    return fail
  return lambda: value


# ---------------------------------------------------------------------------- summary

def target_line(name: str, measured: float | None, target: float, text: str) -> str:
  if measured is None:
    return f"{name}: not measured (stage failed or not run); target {text}"
  value = f"{measured:+.1%}" if name.startswith("loop") else f"{measured:.2f}"
  return (f"{name}: {value}; target {text}: "
          f"{'met' if measured <= target else 'NOT met'}")


def main():
  start = time.perf_counter()
  args = parse_args()
  # A TPU admits one process at a time: recompile.py's processes must run before this one
  # takes the chip, and compile for the per-device batch (one chip).
  recompile_first = "recompile" in args.stages and importlib.util.find_spec("libtpu") is not None
  if recompile_first:
    recompiled = outcome(lambda: measure_recompile(args, args.batch_per_device))
  print(common.machine(), flush=True)
  config = with_batch(load_config("default.py") if args.small else
                      load_config("deit_s_in100.py", "static_full"),
                      args.batch_per_device * jax.device_count())
  info = common.dataset_info(config)
  print(f"{describe(config, info)}; {args.rounds} timed rounds of {args.steps} steps")
  results = {}
  if "step" in args.stages:
    results["step"] = run_stage("train step: images/s and MFU",
                                lambda: step_stage(config, info, args))
    if results["step"]:
      config = results["step"]["config"]  # the batch that fitted
  if "grown" in args.stages:
    results["grown"] = run_stage(f"{GROWN_FRACTION:.0%} grown vs static of equal params",
                                 lambda: grown_stage(config, info, args))
  if "memory" in args.stages:
    results["memory"] = run_stage("peak device memory", memory_stage)
  if "loop" in args.stages:
    results["loop"] = run_stage("training loop overhead per step",
                                lambda: loop_stage(config, info, args))
  if "spectrum" in args.stages:
    results["spectrum"] = run_stage("splitting spectrum in train-step gradients",
                                    lambda: spectrum_stage(args))
  if "recompile" in args.stages:
    measured = recompiled if recompile_first else lambda: measure_recompile(args, config.batch_size)
    results["recompile"] = run_stage("recompile per growth event (cold, then warm cache)",
                                     lambda: recompile_stage(measured()))

  step = results.get("step") or {}
  memory = results.get("memory")
  print("\n== summary")
  print(f"train step: {step['images_per_s']:,.0f} images/s at batch {step['config'].batch_size}, "
        f"MFU {'n/a' if step['mfu'] is None else format(step['mfu'], '.1%')}"
        if step else "train step: not measured")
  print("peak device memory: " + (f"{memory / 2**30:.2f} GiB" if memory else "n/a"))
  print(target_line("grown / static step time", results.get("grown"), TARGETS["grown"], "<= 1.10x"))
  print(target_line("spectrum, train-step gradients", results.get("spectrum"), TARGETS["spectrum"],
                    "<= 12"))
  print(target_line("compile after the 4th event / first compile (cold cache)",
                    results.get("recompile"), TARGETS["recompile"], "<= 2x"))
  print(target_line("loop overhead per step", results.get("loop"), TARGETS["loop"], "<= +2%"))
  print(f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
