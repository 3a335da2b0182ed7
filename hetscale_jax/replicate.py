r"""Replication: growth rules and static models, paired over seeds, with the study's evidence.

    python -m hetscale_jax.replicate --workdir workdirs/replication \
        --config.growth.slots=events                                               # digits
    python -m hetscale_jax.replicate --config configs/study_mnist5k.py \
        --workdir workdirs/study --jobs 2                                          # the study
    python -m hetscale_jax.replicate --config configs/study_mnist5k.py:late \
        --workdir workdirs/study_late --static_workdir workdirs/study --jobs 2   # events later
    python -m hetscale_jax.replicate ... --unit_scales 0.1,0.3,1                    # the sweep
    python -m hetscale_jax.replicate ... --compute_matched splitting,authors   # equal FLOPs
    python -m hetscale_jax.replicate ... --quick                                    # smoke run

Variants of the config (default: configs/default.py; any --config.field=value applies to all):
config_lib.VARIANTS, defined there. --unit_scales runs every variant that takes a unit scale
(config_lib.takes_unit_scale: the gated ones but split) once at each scale, as "splitting@0.3"
(the config's own scale keeps the plain name); the others run once.

Compute-matched statics: --compute_matched names grown runs (e.g. splitting,splitting@0.3);
static_full and static_uniform, where the study runs them, are then also trained on each one's
training FLOPs, seed by seed, as "static_uniform@flops:splitting": once a seed's grown run and
static run have finished, the static's train step FLOPs and the grown run's training FLOPs
(both from their summaries, compute.py) give its steps (config_lib.compute_matched_steps),
its learning-rate schedule compressed to them, warm-up and decay alike (config.train_steps).
These runs live in --workdir, also with --static_workdir: their steps follow this study's
growth.

Pairing: for each seed every variant starts from the same initial parameters where shapes
allow (the grown variants and static_reduced), sees the same batches, and the grown variants
grow at the same steps; they differ only in their growth mechanism. Every variant logs its
training loss at every step, and every rule's growth events also measure the split-mode loss
change on held-aside batches (growth_event.split_check), and unit-only training where the
config asks for it (growth.unit_only_steps). The evidence and its report:
hetscale_jax.evidence.

--quick halves training (half the epochs, growth events at the same fractions of training,
one evaluation at the end). Each run trains in a worker process in its own workdir
<workdir>/<variant>/seed<k> (summary.json, metrics.jsonl, plots, config.json, checkpoints,
train.log); a run whose summary.json exists is not run again and an interrupted one resumes
from its checkpoint, so a stopped replication goes on where it was, seeds, variants and unit
scales can be added, and running the command again over finished runs only renders the
report. --report_only renders the report of the runs finished so far and trains nothing (a
look at a study still running in another process). --static_workdir puts the static variants'
runs in another study's workdir: they do not grow, so two studies that differ only in when
they grow share them (workdir.config_differences accepts them). Every run directory that
holds a config is checked against its run's config before any training.

--archive DIR keeps a study across machines: its finished runs are restored from DIR before
any training (a run finished elsewhere is not trained again) and, once the command ends,
stopped or not, those DIR lacks are added to it as one new runs-<time>.tar.gz (each run's
config, summary and training losses, about 27 KB; commit DIR). With --report_only it archives
the runs finished so far of a study still running in another process. All runs share one
persistent XLA cache in <workdir>/xla_cache. The report goes to
<workdir>/replication.md (and stdout), its figures to <workdir>/loss_around_events.png and
<workdir>/forest.png.
"""

import collections
from collections.abc import Callable
import contextlib
import datetime
import glob
import io
import json
import multiprocessing
from multiprocessing import connection
import os
import platform
import signal
import sys
import tarfile
import time
import traceback
from typing import Any

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import tensorflow as tf

from hetscale_jax import (config_lib, datasets, evidence, growth_event, input_pipeline,
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
_UNIT_SCALES = flags.DEFINE_list(
    "unit_scales", [], "The sweep: every variant that takes a unit scale once at each of these "
    "growth.unit_scale values (none: the config's).")
flags.register_validator("unit_scales", lambda texts: all(map(config_lib.is_positive_number, texts)),
                         "--unit_scales: give numbers > 0, e.g. 0.1,0.3,1")
_STATIC_WORKDIR = flags.DEFINE_string(
    "static_workdir", None, "Where the static variants' runs are (default: --workdir): another "
    "study's workdir, of the same config but for when it grows, shares its static runs.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: the report of the runs finished so far.")
_COMPUTE_MATCHED = flags.DEFINE_list(
    "compute_matched", [], "Grown runs (e.g. splitting,splitting@0.3) on whose training FLOPs "
    "static_full and static_uniform are also trained, seed by seed.")
_ARCHIVE = flags.DEFINE_string(
    "archive", None, "A directory of the study's finished runs (config, summary, losses): "
    "restored from before training, added to at the end.")
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


def sweep_unit_scales(variants, unit_scales: list[float], config_scale: float) -> list[str]:
  """The run names of `variants`: each that takes a unit scale once at each of `unit_scales`
  (none: the config's), the others once. The config's own scale keeps the plain name, so the
  sweep shares those runs with the study run without it."""
  names = []
  for v in variants:
    scales = (unit_scales or [config_scale]) if config_lib.takes_unit_scale(v) else [config_scale]
    names += [v if s == config_scale else config_lib.scaled(v, s) for s in scales]
  return names


def compute_matched_names(variants, matched_to) -> list[str]:
  """The compute-matched runs: every static of config_lib.COMPUTE_MATCHED_STATICS among
  `variants` trained on the FLOPs of each of `matched_to` (grown run names among them).
  ValueError naming the flag if one is not a grown run of the study or no static is in it."""
  not_grown = [g for g in matched_to if g not in variants or not config_lib.is_grown(g)]
  statics = [s for s in config_lib.COMPUTE_MATCHED_STATICS if s in variants]
  if not_grown or (matched_to and not statics):
    raise ValueError(
        f"--compute_matched {','.join(matched_to)}: {not_grown or matched_to} cannot be matched; "
        f"name grown runs of the study, and run {' or '.join(config_lib.COMPUTE_MATCHED_STATICS)}"
        " (their own runs give their train step's FLOPs)")
  return [config_lib.flops_matched(s, g) for g in matched_to for s in statics]


def compute_matched_config(static_config, static_summary: dict, grown_summary: dict):
  """`static_config` trained on the grown run's training FLOPs: the steps
  config_lib.compute_matched_steps gives for them and the static's train step FLOPs, both
  as the two runs' summaries recorded them."""
  c = static_config.copy_and_resolve_references()
  (static_step,) = static_summary["compute"]["train"]  # a static run: one architecture
  c.train_steps = config_lib.compute_matched_steps(grown_summary["compute"]["train_flops"],
                                                   static_step["step_flops"])
  return c


def compute_matched_configs(configs: dict, summaries: dict, names, seeds: int,
                            workdir: str) -> dict:
  """(name, seed) -> (config, run directory) of the compute-matched runs `names` whose seed's
  static and grown runs have finished (`configs` and `summaries` of those, by (variant, seed))."""
  out = {}
  for s in range(seeds):
    for name in names:
      static, grown = config_lib.flops_matched_parts(name)
      if summaries.get((static, s)) is not None and summaries.get((grown, s)) is not None:
        out[name, s] = (compute_matched_config(configs[static, s][0], summaries[static, s],
                                               summaries[grown, s]), run_dir(workdir, name, s))
  return out


# ---------------------------------------------------------------------------- running

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def check_run_dirs(configs: dict) -> None:
  """WorkdirError, before any training, if a run directory holds another config's run."""
  for config, directory in configs.values():
    if (stored := workdir_lib.stored_config(directory)) is not None:
      workdir_lib.refuse_other_config(f"run {directory}", stored, workdir_lib.config_dict(config))


def train_one(config, workdir: str) -> None:
  """One run in this (worker) process, its output in workdir/train.log and, once it finished,
  its summary.json (SIGTERM: a checkpoint instead)."""
  # tf.data only: a full TensorFlow install would otherwise reserve the GPUs' memory.
  tf.config.set_visible_devices([], "GPU")
  # Claimed before train.log goes into it: training refuses a workdir with files but no run.
  workdir_lib.claim(workdir, config)
  with output_to(os.path.join(workdir, "train.log")):
    try:
      train.train_and_evaluate(config, workdir)
    except Exception:
      traceback.print_exc()  # into train.log; the parent reports the failure and goes on
      raise


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


def in_processes(tasks: dict, jobs: int, follow_up: Callable[[Any, int], dict] | None = None):
  """Runs each task, key -> (function, args), in a process of its own, at most `jobs` at a
  time; yields (key, exit code) as they end. `follow_up(key, exit code)`, called as each ends,
  gives tasks that its end made ready to run: they start before those still waiting. SIGTERM
  to this process starts no further task and passes SIGTERM on to the running ones (a training
  run then saves a checkpoint and stops: the same command resumes it)."""
  # Fresh interpreters (not fork): JAX's threads do not survive a fork. One run per process: a
  # process that keeps its compiled executables across runs accumulates them until compiling
  # runs out of memory.
  context = multiprocessing.get_context("spawn")
  waiting, running, stopping = list(tasks), {}, []

  def stop(signum, frame):
    del signum, frame
    stopping.append(True)
    print("SIGTERM: no new run starts; the running ones save a checkpoint and stop. Run the "
          "same command to resume.", flush=True)
    for process in running.values():
      process.terminate()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while running or (waiting and not stopping):
      while waiting and len(running) < jobs and not stopping:
        key = waiting.pop(0)
        function, args = tasks[key]
        process = context.Process(target=function, args=args)
        process.start()
        running[key] = process
        if stopping:  # SIGTERM came before the process was in `running`
          process.terminate()
      connection.wait([p.sentinel for p in running.values()])
      for key in [k for k, p in running.items() if not p.is_alive()]:
        process = running.pop(key)
        process.join()
        yield key, process.exitcode
        if follow_up:
          ready = follow_up(key, process.exitcode)
          tasks = {**tasks, **ready}
          waiting[:0] = list(ready)
  finally:  # an error stops the study as SIGTERM does: the running runs save a checkpoint
    for process in running.values():
      process.terminate()
      process.join()
    signal.signal(signal.SIGTERM, previous)


def run_all(configs: dict, jobs: int, derived: Callable[[dict], dict] = lambda summaries: {}
            ) -> tuple[dict, dict]:
  """Trains every (variant, seed) -> (config, workdir) lacking a summary, and each run that
  `derived(summaries)` gives once the runs it follows from have finished (the compute-matched
  statics; their run directories checked as check_run_dirs checks `configs`' beforehand),
  before the runs still waiting. Returns the summaries by (variant, seed), None for a run
  that did not finish, and "failed" or "stopped" for each run that ended without one."""
  configs, summaries, to_train, ended = dict(configs), {}, set(), {}

  def trainable(new: dict) -> dict:
    configs.update(new)
    summaries.update({key: workdir_lib.read_summary(d) for key, (_, d) in new.items()})
    tasks = {key: (train_one, new[key]) for key in new if summaries[key] is None}
    to_train.update(tasks)
    return tasks

  def ready() -> dict:
    new = {k: v for k, v in derived(summaries).items() if k not in configs}
    check_run_dirs(new)
    return trainable(new)

  todo = trainable(configs)
  todo = ready() | todo
  print(f"{len(configs) - len(todo)} runs already done, {len(todo)} to train with {jobs} "
        "worker process(es)", flush=True)
  start = time.perf_counter()
  for done, (key, exit_code) in enumerate(
      in_processes(todo, jobs, follow_up=lambda key, exit_code: ready()), 1):
    directory = configs[key][1]
    s = summaries[key] = workdir_lib.read_summary(directory)
    if s is not None:
      result = f"top-1 {s['eval']['top1']:.2%}, {s['params']:,} params"
    elif exit_code in (0, -signal.SIGTERM):
      ended[key] = "stopped"
      result = "stopped (SIGTERM): the same command resumes it from its checkpoint"
    else:
      ended[key] = "failed"
      result = f"FAILED (exit code {exit_code}; {directory}/train.log says why)"
    print(f"[{done}/{len(to_train)}, {report.format_minutes(time.perf_counter() - start)}] "
          f"{key[0]} seed {key[1]}: {result}", flush=True)
  return summaries, ended


# ---------------------------------------------------------------------------- archive

ARCHIVED_FILES = (workdir_lib.CONFIG_FILE, workdir_lib.METRICS_FILE, workdir_lib.SUMMARY_FILE)


def _archived_metrics(path: str) -> str:
  """metrics.jsonl as archived: what the study's report reads, training records cut to their
  step and loss, progress records left out (two thirds of a run's metrics, with every step
  logged)."""
  records = []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if record["kind"] == "train":
        record = {k: record[k] for k in ("kind", "step", "loss")}
      if record["kind"] != "progress":
        records.append(json.dumps(record))
  return "".join(r + "\n" for r in records)


def _archive_name(key) -> str:
  return f"{key[0]}/seed{key[1]}"


def read_archive(directory: str) -> dict:
  """(variant, seed) -> {file: text} of every run in `directory`'s archives."""
  runs = {}
  for path in sorted(glob.glob(os.path.join(directory, "runs-*.tar.gz"))):
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        if member.isfile():
          variant, seed, file = member.name.removeprefix("./").split("/")
          runs.setdefault((variant, int(seed.removeprefix("seed"))), {})[file] = (
              tar.extractfile(member).read().decode())
  return runs


def restore_runs(directory: str, configs: dict, run_dir_of: Callable[[Any], str]) -> int:
  """Writes each archived run that has no summary yet into its run directory (`run_dir_of`
  its key), summary last; returns how many. A run of `configs` whose archived config is
  another is refused (WorkdirError) before anything is written."""
  archived = read_archive(directory)
  for key, files in archived.items():
    if key in configs:
      workdir_lib.refuse_other_config(
          f"archived run {_archive_name(key)} in {directory}",
          json.loads(files[workdir_lib.CONFIG_FILE]), workdir_lib.config_dict(configs[key][0]))
  restored = 0
  for key, files in archived.items():
    directory_of_run = run_dir_of(key)
    if workdir_lib.read_summary(directory_of_run) is None:
      os.makedirs(directory_of_run, exist_ok=True)
      for file in ARCHIVED_FILES:
        with open(os.path.join(directory_of_run, file), "w") as f:
          f.write(files[file])
      restored += 1
  return restored


def archive_runs(directory: str, run_dirs: dict) -> str | None:
  """Adds the finished runs of `run_dirs` ((variant, seed) -> run directory) that
  `directory`'s archives lack to a new archive there; returns its path (None: none new)."""
  archived = read_archive(directory) if os.path.isdir(directory) else {}
  new = {key: d for key, d in sorted(run_dirs.items())
         if key not in archived and workdir_lib.read_summary(d) is not None}
  if not new:
    return None
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"runs-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.tar.gz")
  with tarfile.open(path + ".tmp", "w:gz") as tar:  # renamed once whole
    for key, run in new.items():
      for file in ARCHIVED_FILES:
        source = os.path.join(run, file)
        if file == workdir_lib.METRICS_FILE:
          text = _archived_metrics(source)
        else:
          with open(source) as f:
            text = f.read()
        data = text.encode()
        info = tarfile.TarInfo(f"{_archive_name(key)}/{file}")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
  os.replace(path + ".tmp", path)
  return path


# ---------------------------------------------------------------------------- report

def code_line(summaries: dict) -> str:
  """The commits the finished runs ran at, with their counts (summary["commit"])."""
  commits = collections.Counter(s.get("commit") or "not recorded"
                                for s in summaries.values() if s is not None)
  return "Code: " + "; ".join(f"commit {c} ({n} runs)" for c, n in commits.most_common()) + "."


def settings(base, seeds: int, jobs: int, wall_seconds: float | None, summaries: dict
             ) -> list[str]:
  """The report's opening lines; wall_seconds None: this call trained nothing."""
  g = base.growth
  # A report alone (wall_seconds None) does not know how the runs were trained.
  run = ("" if wall_seconds is None
         else f"; {jobs} run(s) at a time, {wall_seconds / 60:.0f} min in all")
  return [code_line(summaries), "",
      f"Date {datetime.date.today().isoformat()}; {platform.node()}, {os.cpu_count()} CPU "
      f"cores, {jax.devices()[0].platform}; python {platform.python_version()}, jax "
      f"{jax.__version__}{run}.",
      f"Config: DeiT-{base.model.variant} width {base.model.width}, depth {base.model.depth}, "
      f"{base.model.num_heads} heads, reduced head_dim {base.model.head_dim} / mlp_dim "
      f"{base.model.mlp_dim}, patch {base.model.patch_size}, on {base.data.name}; "
      f"{base.num_epochs} epochs at batch {base.batch_size}; growth events at epochs "
      f"{tuple(g.epochs)}, "
      + (f"up to {g.target_params:,} params" if g.target_params else
         f"{g.budget_per_event:,} params each") + " (max layer fraction "
      f"{g.max_layer_fraction}, unit scale {g.unit_scale} unless the variant sets one, "
      f"{g.num_iters} Lanczos iterations); seeds 0-{seeds - 1}.",
  ]


def study_measures(configs: dict, summaries: dict, event_steps: list[int],
                   k: int) -> tuple[dict, dict]:
  """(evidence.run_measures, evidence.train_losses) of every finished run, by (variant, seed)."""
  losses = {key: evidence.train_losses(configs[key][1])
            for key, s in summaries.items() if s is not None}
  measures = {key: evidence.run_measures(
                  summaries[key], run_losses, event_steps, k,
                  report.config_flops(configs[key][0], summaries[key]["architecture"]))
              for key, run_losses in losses.items()}
  return measures, losses


def run_study(base, workdir: str, *, seeds: int, jobs: int, variants, post_event_steps: int,
              report_only: bool = False, static_workdir: str | None = None,
              compute_matched=(), archive: str | None = None
              ) -> tuple[str, collections.Counter]:
  """Trains what is missing of every (variant, seed) (report_only: nothing), seed by seed,
  and of the statics trained on the FLOPs of the grown runs `compute_matched` names (module
  docstring) as soon as their seed's runs have finished, and writes the report of the runs
  that finished; returns its text and how many runs ended "failed", "stopped" or "not
  started" without finishing (none when report_only). The static variants' runs are in
  `static_workdir` (default: `workdir`). `archive`: the directory of the study's finished
  runs, restored from first and added to last (module docstring)."""
  matched_names = compute_matched_names(variants, list(compute_matched))
  if base.growth.slots != "events":
    # Slots held from the start differ in shape between unit kinds and are absent from static
    # variants: the programs would differ, and rounding would part the runs before any event.
    raise config_lib.ConfigError(
        f"config.growth.slots={base.growth.slots!r} is invalid for a study: its variants must "
        "train bit-identically up to their first event; use 'events'")
  base.compilation_cache_dir = os.path.abspath(os.path.join(workdir, "xla_cache"))
  info = input_pipeline.dataset_info(base.data)
  sizes = train.model_sizes(base, info)
  # Seed by seed: a replication stopped early has about as many seeds of every variant.
  home = lambda v: (static_workdir or workdir) if v in config_lib.STATIC_VARIANTS else workdir
  configs = {(v, s): (variant_config(base, v, s, sizes), run_dir(home(v), v, s))
             for s in range(seeds) for v in variants}
  if archive:
    restored = restore_runs(archive, configs, lambda key: run_dir(home(key[0]), *key))
    print(f"{restored} finished runs restored from {archive}", flush=True)
  check_run_dirs(configs)
  os.makedirs(workdir, exist_ok=True)  # the report's, even where every run is elsewhere
  start = time.perf_counter()
  # Their steps follow from finished runs: each is trained once its seed's two are.
  matched = lambda summaries: compute_matched_configs(configs, summaries, matched_names, seeds,
                                                      workdir)
  if report_only:
    summaries = {key: workdir_lib.read_summary(d) for key, (_, d) in configs.items()}
    derived = matched(summaries)
    summaries |= {key: workdir_lib.read_summary(d) for key, (_, d) in derived.items()}
  else:
    summaries, ended = run_all(configs, jobs, derived=matched)
    derived = matched(summaries)
  expected = len(configs) + len(matched_names) * seeds
  configs |= derived
  growth_config = base.copy_and_resolve_references()
  growth_config.growth.enabled = True
  event_steps = growth_event.event_steps(
      growth_config, datasets.steps_per_epoch(info, base.batch_size))
  measures, losses = study_measures(configs, summaries, event_steps, post_event_steps)
  finished = sum(s is not None for s in summaries.values())
  lines = ["# Replication", ""]
  if finished < expected:
    lines += [f"**{finished} of {expected} runs finished: a report of a study in progress.**", ""]
  lines += settings(base, seeds, jobs, None if report_only else time.perf_counter() - start,
                    summaries)
  lines += [f"K = {post_event_steps} steps after each growth event (at steps {event_steps}).", ""]
  lines += evidence.study_report(measures, losses, list(variants) + matched_names, seeds,
                                 event_steps, post_event_steps, workdir)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "replication.md"), "w") as f:
    f.write(text)
  # Its own runs: another study's static runs belong to that study's archive.
  if archive and (added := archive_runs(archive, {key: d for key, (_, d) in configs.items()
                                                  if home(key[0]) == workdir})):
    print(f"finished runs archived in {added}", flush=True)
  if report_only:
    return text, collections.Counter()
  return text, collections.Counter(ended.get(key, "not started")
                                   for key, s in summaries.items() if s is None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; choose from {VARIANTS}")
  base = flags.FLAGS.config
  if _QUICK.value:
    base = quick(base)
  variants = sweep_unit_scales([v for v in VARIANTS if v in _VARIANTS.value],
                               [float(s) for s in _UNIT_SCALES.value], base.growth.unit_scale)
  try:
    compute_matched_names(variants, _COMPUTE_MATCHED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  text, unfinished = run_study(
      base, _WORKDIR.value, seeds=_SEEDS.value, jobs=_JOBS.value, variants=variants,
      post_event_steps=_POST_EVENT_STEPS.value, report_only=_REPORT_ONLY.value,
      static_workdir=_STATIC_WORKDIR.value, compute_matched=_COMPUTE_MATCHED.value,
      archive=_ARCHIVE.value)
  print("\n" + text)
  if unfinished:
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(unfinished.items()))
    sys.exit(f"runs not finished: {counts}. The lines above say which, a failed "
             "run's train.log says why, and the same command resumes")


if __name__ == "__main__":
  app.run(main)
