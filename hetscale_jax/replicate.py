r"""Replication: growth rules and static models, paired over seeds, with the study's evidence.

    python -m hetscale_jax.replicate --workdir workdirs/replication                  # digits
    python -m hetscale_jax.replicate --config configs/study_mnist5k.py \
        --workdir workdirs/study --jobs 2                                          # the study
    python -m hetscale_jax.replicate ... --quick                                    # smoke run

Variants of the config (default: configs/default.py; any --config.field=value applies to all),
as config_lib.VARIANTS defines them:

  splitting, authors,    the reduced model grown by that mechanism (rule, unit kind and
  grad_norm, random,     allocation) at the config's growth events, with the same budget
  random_linear,
  uniform, first_order
  static_reduced         the reduced model, never grown
  static_full            the full widths (head_dim = width / num_heads, mlp_dim = 4 * width)
  static_uniform         head_dim and mlp_dim in the full model's ratio, the pair whose
                         parameter count is closest to the grown models' (growth.target_params,
                         or the start plus every event's budget): conventional scaling

Pairing: for each seed every variant starts from the same initial parameters where shapes
allow (the grown variants and static_reduced), sees the same batches, and the grown variants
grow at the same steps; they differ only in their growth mechanism. Every variant logs its training loss
at every step, and every rule's growth events also measure the split-mode loss change on a
held-aside batch (growth_event.split_check). The evidence (hetscale_jax.evidence): per variant
the final test top-1 and loss, parameters, FLOPs, the mean training loss of the
--post_event_steps steps after each event and the split check; paired differences with 95%
intervals of each rule to splitting and to static_uniform; the training loss around each event
and a forest plot of the differences.

--quick halves training (half the epochs, growth events at the same fractions of training,
one evaluation at the end). Each run trains in a worker process in its own workdir
<workdir>/<variant>/seed<k> (summary.json, metrics.jsonl, plots, config.json, checkpoints,
train.log); a run whose summary.json exists is not run again and an interrupted one resumes
from its checkpoint, so a stopped replication goes on where it was, seeds can be added, and
running the command again over finished runs only renders the report. All runs share one
persistent XLA cache in <workdir>/xla_cache. The report goes to <workdir>/replication.md (and
stdout), its figures to <workdir>/loss_around_events.png and <workdir>/forest.png.
"""

from concurrent import futures
import contextlib
import datetime
import multiprocessing
import os
import platform
import sys
import time
import traceback

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from hetscale_jax import (config_lib, datasets, evidence, growth_event, input_pipeline, plots,
                          report, train)
from hetscale_jax import workdir as workdir_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = config_lib.VARIANTS

config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "default.py"),
                                "Base config of every variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0 .. seeds-1 of every variant.")
_QUICK = flags.DEFINE_bool("quick", False, "Half the config's epochs, one evaluation.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Runs trained at once, each in its own process.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which variants to run.")
_POST_EVENT_STEPS = flags.DEFINE_integer(
    "post_event_steps", 50, "K: the training steps after each growth event whose mean loss "
    "the rules are compared on.")


# ---------------------------------------------------------------------------- configs

def quick(config):
  """Half the epochs; warm-up and growth events at the same fractions of training; one
  evaluation, at the end."""
  c = config.copy_and_resolve_references()
  epochs = max(c.num_epochs // 2, 1)
  scale = epochs / c.num_epochs
  c.num_epochs = epochs
  c.growth.epochs = tuple(e * scale for e in c.growth.epochs)
  c.optim.warmup_epochs *= scale
  c.eval_every_epochs = float(epochs)
  return c


def variant_config(base, variant: str, seed: int, sizes: dict):
  """The config of one run (config_lib.apply_variant; `sizes` as train.model_sizes gives)."""
  c = config_lib.apply_variant(base, variant, sizes)
  c.seed = seed
  c.log_every_steps = 1  # the loss of every step: post-event means, loss around the events
  c.growth.measure_split = c.growth.enabled
  return c


# ---------------------------------------------------------------------------- running

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def train_one(config, workdir: str) -> dict:
  """One run in this (worker) process, its output in workdir/train.log."""
  # tf.data only: a full TensorFlow install would otherwise reserve the GPUs' memory.
  tf.config.set_visible_devices([], "GPU")
  # Claimed before train.log goes into it: training refuses a workdir with files but no run.
  workdir_lib.claim(workdir, config)
  with output_to(os.path.join(workdir, "train.log")):
    try:
      summary = train.train_and_evaluate(config, workdir)
    except Exception:
      traceback.print_exc()  # into train.log; the parent reports the failure and goes on
      raise
  if summary is None:
    raise RuntimeError("stopped early (SIGTERM); run the replication again to resume it")
  return summary


@contextlib.contextmanager
def output_to(path: str):
  """This process's stdout and stderr, C++ logging included, are appended to `path` for a
  while (a resumed run adds to its earlier log)."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, "a") as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)


def run_all(configs: dict, jobs: int) -> dict:
  """Trains every (variant, seed) -> (config, workdir) lacking a summary; returns the
  summaries by (variant, seed), None for a failed run."""
  summaries = {key: workdir_lib.read_summary(d) for key, (_, d) in configs.items()}
  todo = [key for key, s in summaries.items() if s is None]
  print(f"{len(configs) - len(todo)} runs already done, {len(todo)} to train with {jobs} "
        "worker process(es)", flush=True)
  # Fresh interpreters (not fork): JAX's threads do not survive a fork.
  context = multiprocessing.get_context("spawn")
  start = time.perf_counter()
  # One run per worker process: a worker that keeps its compiled executables across runs
  # accumulates them until compiling runs out of memory.
  with futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
    running = {pool.submit(train_one, *configs[key]): key for key in todo}
    for done, future in enumerate(futures.as_completed(running), 1):
      variant, seed = key = running[future]
      try:
        s = summaries[key] = future.result()
        result = f"top-1 {s['eval']['top1']:.2%}, {s['params']:,} params"
      except Exception as e:  # pylint: disable=broad-except  (one failed run: keep the others)
        result = f"FAILED ({type(e).__name__}: {e}; see {configs[key][1]}/train.log)"
      print(f"[{done}/{len(todo)}, {report.format_minutes(time.perf_counter() - start)}] "
            f"{variant} seed {seed}: {result}", flush=True)
  return summaries


# ---------------------------------------------------------------------------- table

def mean_std(values) -> str:
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def table(configs: dict, summaries: dict, variants) -> list[str]:
  rows = []
  for variant in variants:
    keys = [k for k in configs if k[0] == variant]
    done = [(k, summaries[k]) for k in keys if summaries[k] is not None]
    top1 = [100 * s["eval"]["top1"] for _, s in done]
    params = sorted({s["params"] for _, s in done})
    flops = [report.config_flops(configs[k][0], s["architecture"]) for k, s in done]
    rows.append([variant, f"{len(done)}/{len(keys)}", mean_std(top1),
                 mean_std([100 * s["eval"]["top5"] for _, s in done]),
                 (f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}")
                 if params else "n/a",
                 f"{np.mean(flops) / 1e6:.2f}" if flops and None not in flops else "n/a",
                 f"{np.mean([s['wall_seconds'] for _, s in done]):.0f}" if done else "n/a"])
  return report.markdown_table(["variant", "runs", "top-1 % (mean ± std)", "top-5 %",
                               "params (final)", "MFLOPs/image", "wall s/run"], rows)


def settings(base, seeds: int, jobs: int, wall_seconds: float) -> list[str]:
  g = base.growth
  return [
      f"Date {datetime.date.today().isoformat()}; {platform.node()}, {os.cpu_count()} CPU "
      f"cores, {jax.devices()[0].platform}; python {platform.python_version()}, jax "
      f"{jax.__version__}; {jobs} run(s) at a time, {wall_seconds / 60:.0f} min in all.",
      f"Config: DeiT-{base.model.variant} width {base.model.width}, depth {base.model.depth}, "
      f"{base.model.num_heads} heads, reduced head_dim {base.model.head_dim} / mlp_dim "
      f"{base.model.mlp_dim}, patch {base.model.patch_size}, on {base.data.name}; "
      f"{base.num_epochs} epochs at batch {base.batch_size}; growth events at epochs "
      f"{tuple(g.epochs)}, "
      + (f"up to {g.target_params:,} params" if g.target_params else
         f"{g.budget_per_event:,} params each") + " (max layer fraction "
      f"{g.max_layer_fraction}, {g.num_iters} Lanczos iterations); seeds 0-{seeds - 1}.",
      "Std: sample standard deviation over seeds (ddof 1).",
  ]


# ---------------------------------------------------------------------------- evidence

def study_measures(configs: dict, summaries: dict, event_steps: list[int], k: int) -> dict:
  """evidence.run_measures of every finished run, by (variant, seed)."""
  return {key: evidence.run_measures(
              s, evidence.train_losses(configs[key][1]), event_steps, k,
              report.config_flops(configs[key][0], s["architecture"]))
          for key, s in summaries.items() if s is not None}


def evidence_sections(configs: dict, summaries: dict, variants, event_steps: list[int], k: int,
                      workdir: str) -> list[str]:
  """The study's tables (markdown lines); draws its two figures into workdir."""
  measures = study_measures(configs, summaries, event_steps, k)
  events = range(1, len(event_steps) + 1)
  rules = [v for v in config_lib.GROWN_VARIANTS if v in variants]
  per_event = lambda *names: [f"{n}/{i}" for n in names for i in events]
  lines = ["", "## Per variant (mean ± 95% half-width over seeds)", ""]
  lines += evidence.summary_table(measures, variants, ["top1", "test_loss", "params", "mflops"]
                                  + per_event("post_event_loss"))
  if rules:
    lines += ["", "## What the units carry: change when every unit is switched off (mean ± 95% "
              "half-width)", ""]
    lines += evidence.summary_table(measures, rules, ["units_off_top1", "units_off_loss"])
  if rules:
    lines += ["", "## The criterion: growth events in split mode, loss change per million added "
              "parameters", "",
              "The chosen neurons grown as gated units in split mode at growth.split_check_scale "
              "eps, each gain downhill. split_predicted: the second-order prediction, the sum of "
              "-1/2 eps^2 |r^T S r| over the chosen units (on the probe); split_probe: measured on "
              "the probe; split_check: measured on the held-aside check batch (the first test "
              "batch).", ""]
    lines += evidence.summary_table(measures, rules, per_event("split_predicted", "split_probe",
                                                               "split_check"))
  pairs = [(v, "splitting") for v in rules[1:] + ["static_reduced"] if v in variants]
  rows = evidence.comparisons(measures, pairs, ["top1", "test_loss"]
                              + per_event("post_event_loss", "split_check"))
  conventional = [(v, "static_uniform") for v in rules] if "static_uniform" in variants else []
  conventional += [("static_full", "static_reduced")] if {"static_full", "static_reduced"} <= set(variants) else []
  rows += evidence.comparisons(measures, conventional, ["top1", "test_loss"])
  lines += ["", "## Paired differences (variant - reference, same seed; 95% t-interval)", ""]
  lines += evidence.comparison_table(rows)
  if rows:
    plots.save(evidence.forest_figure(rows), os.path.join(workdir, "forest.png"))
  curves = {v: [evidence.train_losses(configs[key][1]) for key in configs
                if key[0] == v and summaries[key] is not None]
            for v in rules + ["static_reduced"] if v in variants}
  if event_steps and curves:
    plots.save(evidence.loss_around_events_figure(curves, event_steps, before=k, after=2 * k),
               os.path.join(workdir, "loss_around_events.png"))
  lines += ["", "![training loss around the growth events](loss_around_events.png)", "",
            "![paired differences](forest.png)"]
  return lines


def run_study(base, workdir: str, *, seeds: int, jobs: int, variants,
              post_event_steps: int) -> tuple[str, int]:
  """Trains what is missing of every (variant, seed) and writes the report (of the runs that
  finished); returns its text and the number of failed runs."""
  base.compilation_cache_dir = os.path.abspath(os.path.join(workdir, "xla_cache"))
  info = input_pipeline.dataset_info(base.data)
  sizes = train.model_sizes(base, info)
  # Seed by seed: a replication stopped early has about as many seeds of every variant.
  configs = {(v, s): (variant_config(base, v, s, sizes), run_dir(workdir, v, s))
             for s in range(seeds) for v in variants}
  start = time.perf_counter()
  summaries = run_all(configs, jobs)
  growth_config = base.copy_and_resolve_references()
  growth_config.growth.enabled = True
  event_steps = growth_event.event_steps(
      growth_config, datasets.steps_per_epoch(info, base.batch_size))
  lines = ["# Replication", ""] + settings(base, seeds, jobs, time.perf_counter() - start)
  lines += [f"K = {post_event_steps} steps after each growth event (at steps {event_steps}).",
            "", "## Final results", ""] + table(configs, summaries, variants)
  lines += evidence_sections(configs, summaries, variants, event_steps, post_event_steps, workdir)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "replication.md"), "w") as f:
    f.write(text)
  return text, sum(s is None for s in summaries.values())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; choose from {VARIANTS}")
  base = flags.FLAGS.config
  if _QUICK.value:
    base = quick(base)
  variants = [v for v in VARIANTS if v in _VARIANTS.value]
  text, failed = run_study(base, _WORKDIR.value, seeds=_SEEDS.value, jobs=_JOBS.value,
                           variants=variants, post_event_steps=_POST_EVENT_STEPS.value)
  print("\n" + text)
  if failed:
    sys.exit(f"{failed} run(s) failed; their train.log says why")


if __name__ == "__main__":
  app.run(main)
