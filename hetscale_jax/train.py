"""Training with growth events: the DeiT recipe plus the growth schedule (docs/method.md,
"Training recipe and schedule").

    train_and_evaluate(config, workdir) -> final summary dict (None if stopped early)

At a growth event the next training batches serve as the probe (growth_event.py); the train
step is then compiled anew for the grown parameter tree. The host counts the steps itself and
waits for the devices only where it reads a result (logging, evaluation, checkpoints, growth),
while batches are copied to the devices two steps ahead.

Re-running on the same workdir resumes from its newest checkpoint, grown architecture included
(checkpoint.py): every N steps, after each growth event and on SIGTERM the state is saved.
"""

from collections.abc import Callable
import dataclasses
import functools
import itertools
import os
import time
from typing import Any

from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import optax

from hetscale_jax import (ablation, checkpoint, compile_log, compute, config_lib, datasets, growth_event,
                          input_pipeline, layers, losses, optim, plots, sharding, spec, writers)
from hetscale_jax import workdir as workdir_lib
from hetscale_jax.models import deit


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  growth: Any           # the "growth" collection: unit indices, not trained
  opt_state: Any
  rng: jax.Array        # raw uint32 key: drop-path and mixup randomness of step i is fold_in(rng, i)
  first_bad_step: jax.Array  # -1, or the first step whose loss or gradient was not finite

  @property
  def variables(self):
    return {"params": self.params, "growth": self.growth}


# ---------------------------------------------------------------------------- model, optimizer

def model_sizes(config, info: datasets.DatasetInfo) -> dict:
  """The config's model sizes on this dataset, as deit.param_count and deit.uniform_widths
  take them (unset widths are the variant's)."""
  m = config.model
  return dict(num_classes=info.num_classes, img_size=info.image_shape[0],
              channels=info.image_shape[2], patch_size=m.patch_size, width=m.width,
              depth=m.depth, num_heads=m.num_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim)


def create_model(config, info: datasets.DatasetInfo):
  m = config.model
  sizes = model_sizes(config, info)
  del sizes["channels"]  # the model reads it off its input
  return deit.create(m.variant, drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype),
                     unit_activation=m.unit_activation, **sizes)


def model_input(config) -> Callable[[jax.Array], jax.Array]:
  """Batch images (the pipeline's compact dtype) -> the model's float input, inside jit."""
  return functools.partial(datasets.normalize, dataset=config.data.name)


def peak_learning_rate(config) -> float:
  """optim.base_lr scaled with the batch size (base_lr is the lr at batch 512)."""
  return config.optim.base_lr * config.batch_size / 512


def event_weights(config, lr_schedule: optax.Schedule, event_steps: list[int]) -> list[float]:
  """growth_event.budget_weights of the events at `event_steps`, their learning rates taken
  relative to the peak."""
  return growth_event.budget_weights(
      config.growth, [float(lr_schedule(s)) / peak_learning_rate(config) for s in event_steps])


def num_train_steps(config, steps_per_epoch: int) -> int:
  """The steps the run trains: config.train_steps, or num_epochs of steps (train_steps 0)."""
  return config.train_steps or config.num_epochs * steps_per_epoch


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from warmup_lr, cosine to min_lr; with config.train_steps, warm-up and
  decay alike compressed (or stretched) from num_epochs of steps to train_steps."""
  o = config.optim
  steps = num_train_steps(config, steps_per_epoch)
  compression = steps / (config.num_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      init_value=o.warmup_lr, peak_value=peak_learning_rate(config),
      warmup_steps=int(o.warmup_epochs * steps_per_epoch * compression),
      decay_steps=steps, end_value=o.min_lr)


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  o = config.optim
  return optim.adamw(learning_rate_schedule(config, steps_per_epoch), b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay)


def init_state(config, model, tx, info) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  variables = growth_event.scheduled_slots(
      config, model.init({"params": jax.random.fold_in(rng, 0)}, dummy, train=False))
  params = variables["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    growth=variables.get("growth", {}),
                    opt_state=tx.init(params), rng=jax.random.fold_in(rng, 1),
                    first_bad_step=jnp.full([], -1, jnp.int32))


def abstract_state(config, model, tx, info, mesh, architecture: dict) -> TrainState:
  """ShapeDtypeStructs, with shardings, of the state of the model grown as `architecture`
  (spec.from_variables) says: what a checkpoint is restored into."""
  base = jax.eval_shape(lambda: init_state(config, model, tx, info))
  variables = spec.abstract_variables(architecture, base.variables)
  params = variables["params"]
  state = base.replace(params=params, growth=variables.get("growth", {}),
                       opt_state=jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_shardings(mesh, state))


# ---------------------------------------------------------------------------- steps

def make_train_step(model, tx, config, num_classes: int):
  to_input = model_input(config)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    mix_rng, drop_rng = jax.random.split(step_rng)
    targets = losses.soft_targets(batch["label"], num_classes, config.label_smoothing)
    images, targets = losses.mix_batch(mix_rng, to_input(batch["image"]), targets, config.mixup)

    def loss_fn(params):
      logits = model.apply({"params": params, "growth": state.growth}, images, train=True,
                           rngs={"dropout": drop_rng})
      return losses.cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   live=layers.live_slots(state.variables))
    params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing; the host stops at its next check, naming the step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), first_bad_step=first_bad)
    return new_state, {"loss": loss, "grad_norm": grad_norm}
  return train_step


def make_eval_step(model, config):
  to_input = model_input(config)

  @jax.jit
  def eval_step(variables, batch):
    logits = model.apply(variables, to_input(batch["image"]), train=False)
    return losses.classification_sums(logits, batch["label"], batch["mask"])
  return eval_step


def make_contribution_step(model, config):
  """variables, batch -> the units' mean |contribution| per neuron that every grown layer
  sows (layers.CONTRIBUTION)."""
  to_input = model_input(config)

  @jax.jit
  def contribution_step(variables, batch):
    _, sown = model.apply(variables, to_input(batch["image"]), train=False,
                          mutable=[layers.CONTRIBUTION[0]])
    return sown[layers.CONTRIBUTION[0]]
  return contribution_step


def state_shardings(mesh, state):
  shardings = sharding.tree_shardings(mesh, state)
  rep = sharding.replicated(mesh)
  return shardings.replace(step=rep, rng=rep, first_bad_step=rep)


@dataclasses.dataclass
class CompiledStep:
  fn: Any
  shardings: Any
  seconds: float
  flops: float  # of one step on all devices (compute.py)


def compile_train_step(train_step, mesh, state, batch) -> CompiledStep:
  """Ahead-of-time compile for this parameter tree (once at start, once per growth event).

  Lowered on shapes alone: a grown state may hold arrays placed elsewhere than the step's
  shardings (new units computed from sharded kernels); the caller puts it on them.
  """
  shardings = state_shardings(mesh, state)
  start = time.perf_counter()
  fn = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
               out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  lowered = fn.lower(*jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   (state, batch)))
  with compile_log.program("train_step"):
    compiled = lowered.compile()
  return CompiledStep(compiled, shardings, time.perf_counter() - start,
                      compute.program_flops(compiled) * jax.device_count())


def evaluate(eval_step, variables, config, mesh) -> dict:
  batches = sharding.prefetch_to_mesh(
      input_pipeline.eval_batches(config.data, global_batch_size=config.batch_size), mesh)
  # Named around the step alone: the eager additions compile programs of their own.
  named_step = compile_log.named("eval_step", eval_step)
  totals = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b),
                            (named_step(variables, batch) for batch in batches))
  totals = sharding.host_value(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count, "count": int(count)}


def unit_ablation(model, eval_step, config, mesh, variables, intact: dict) -> dict:
  """ablation.unit_ablation on the test set (contributions on its first batch)."""
  contribution_step = compile_log.named("contribution_step", make_contribution_step(model, config))
  first, = first_eval_batches(config, mesh, 1)
  return ablation.unit_ablation(
      lambda v: evaluate(eval_step, v, config, mesh),
      lambda v: sharding.host_value(contribution_step(v, first)), variables, intact)


def first_eval_batches(config, mesh, n: int) -> list:
  return list(itertools.islice(sharding.prefetch_to_mesh(
      input_pipeline.eval_batches(config.data, global_batch_size=config.batch_size), mesh), n))


def held_aside_batches(config, mesh) -> list | None:
  """The fixed batches on which growth events measure the split-mode loss change and unit-only
  training (growth_event.py): the first growth.held_aside_batches eval batches, never trained
  on; None if the config measures neither."""
  g = config.growth
  if not (g.measure_split or g.unit_only_steps > 0):
    return None
  return first_eval_batches(config, mesh, g.held_aside_batches)


def batches_ahead(config) -> int:
  """Training batches a growth event reads ahead: its probe, and unit-only training's."""
  return max(config.growth.probe_batches, config.growth.unit_only_steps)


def peek(iterator, n: int) -> tuple[list, Any]:
  """The next `n` items of `iterator`, and an iterator that still yields them first."""
  ahead = list(itertools.islice(iterator, n))
  return ahead, itertools.chain(ahead, iterator)


def wait_for_warm_up(warm_up) -> float:
  """Seconds spent waiting for the spectrum's warm-up thread (None: none) to end."""
  start = time.perf_counter()
  if warm_up:
    warm_up.join()
  return time.perf_counter() - start


def grow_and_recompile(config, model, tx, train_step, mesh, state, next_batches,
                       weights_left: list[float], num_classes: int, held_aside=None):
  """A growth event (growth_event.grow_state: `next_batches`, `held_aside` as it takes them) and
  the train step compiled for its result; in a run that measures its events, the record gets
  its own work's FLOPs (compute.py)."""
  before = state.variables
  state, event = growth_event.grow_state(config, model, tx, state, next_batches,
                                         weights_left=weights_left, num_classes=num_classes,
                                         model_input=model_input(config),
                                         peak_lr=peak_learning_rate(config), held_aside=held_aside)
  if held_aside:
    event.record["work_flops"] = compute.event_work(
        config, growth_event.probe_loss(model, num_classes, config.label_smoothing,
                                        model_input(config)),
        before, state.variables, next_batches, held_aside, peak_learning_rate(config),
        event.record["step"])
  compiled = compile_train_step(train_step, mesh, state, next_batches[0])
  event.record["seconds_compile"] = compiled.seconds
  return sharding.put(state, compiled.shardings), compiled, event


# ---------------------------------------------------------------------------- the loop

# What a run compiles, as compile_log names it; summary["compiles"] counts each.
PROGRAMS = ("train_step", "eval_step", "spectrum", "contribution_step")


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` ("": none), for every program, however
  quickly it compiles: JAX's default keeps only those of a second or more, and a run's many
  small ones (initialisation, a growth event's eager arithmetic and loss evaluations) then
  compile again in every process of a resumed run or a study."""
  if directory:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def train_and_evaluate(config, workdir: str, *, fresh: bool = False,
                       stop_after_steps: int | None = None) -> dict | None:
  """Trains (or resumes) the run of `config` in `workdir`; returns the final summary.

  Returns None if the run stopped early, with a checkpoint to resume from: on SIGTERM, or at
  `stop_after_steps` (a stop that leaves the config, hence the schedule, unchanged). Bad
  inputs and a workdir of another run are refused before anything is written. `fresh` starts
  a new run in a new sub-workdir of `workdir` if it holds anything (workdir.fresh).
  """
  config_lib.validate(config)
  info = input_pipeline.dataset_info(config.data)  # fails at once if the data is missing
  config_lib.check_against_data(config, info)
  config_lib.check_against_devices(config, jax.device_count())
  # Before anything compiles (choosing and claiming the workdir synchronise hosts): JAX sets
  # its persistent cache up at the first compilation and ignores a directory named later.
  use_compilation_cache(config.compilation_cache_dir)
  if fresh:
    workdir = workdir_lib.fresh(workdir)
    print(f"fresh run in {workdir} (to resume it: --workdir {workdir}, without --fresh)")
  workdir_lib.claim(workdir, config)
  with checkpoint.Checkpointer(workdir, config) as ckpt:
    return _train_and_evaluate(config, workdir, info, ckpt, stop_after_steps)


def _train_and_evaluate(config, workdir: str, info, ckpt: checkpoint.Checkpointer,
                        stop_after_steps: int | None) -> dict | None:
  steps_per_epoch = datasets.steps_per_epoch(info, config.batch_size)
  total_steps = num_train_steps(config, steps_per_epoch)
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  events = growth_event.event_steps(config, steps_per_epoch)
  if (finished := finished_summary(workdir, ckpt, total_steps)) is not None:
    return finished
  compiled_before = compile_log.totals()  # the summary counts what this call compiles

  mesh = sharding.make_mesh(config.mesh.fsdp)
  model, tx = create_model(config, info), create_optimizer(config, steps_per_epoch)
  train_step, eval_step = make_train_step(model, tx, config, info.num_classes), make_eval_step(model, config)
  restored = ckpt.restore(functools.partial(abstract_state, config, model, tx, info, mesh))
  state, growth_log = ((restored.state, restored.growth_events) if restored
                       else (init_state(config, model, tx, info), []))
  state = sharding.put(state, state_shardings(mesh, state))
  start_step = int(state.step)  # the host counts from here on: no per-step wait for the devices
  batches = sharding.prefetch_to_mesh(input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step), mesh)
  (first,), batches = peek(batches, 1)
  held_aside = held_aside_batches(config, mesh)
  # The next event scores the model as it is now: its spectrum compiles meanwhile, the first
  # event's beside the train step. Slots held from the start keep its programs for every event.
  warm_up_for = lambda state, batch: (
      growth_event.warm_up_spectrum(config, model, state, batch, num_classes=info.num_classes,
                                    model_input=model_input(config))
      if len(growth_log) < len(events) and jax.process_count() == 1 else None)
  warm_up = warm_up_for(state, first)
  compiled = compile_train_step(train_step, mesh, state, first)
  writer = writers.create(workdir)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  num_params = spec.count_params(state.variables)
  base_params = growth_log[0]["params_before"] if growth_log else num_params
  lr_schedule = learning_rate_schedule(config, steps_per_epoch)
  weights = event_weights(config, lr_schedule, events)
  report_start(config, info, base_params, total_steps, events, compiled.seconds,
               resumed_at=(start_step, len(growth_log)) if restored else None)

  run_start, last_eval = time.perf_counter(), {}
  for step in range(start_step, total_steps):
    if step in events[len(growth_log):]:  # a resumed run restored the earlier events grown
      with progress.timed("growth", wait_jax_async_dispatch=False):
        waited = wait_for_warm_up(warm_up)  # the spectrum's compile: part of the event's wait
        ahead, batches = peek(batches, batches_ahead(config))
        trained_flops = compiled.flops  # of the architecture trained up to this event
        state, compiled, event = grow_and_recompile(config, model, tx, train_step, mesh, state, ahead,
                                                    weights[events.index(step):], info.num_classes,
                                                    held_aside)
        event.record["seconds_spectrum"] += waited
        event.record["step_flops_before"] = trained_flops
        num_params = event.record["params_after"]
        growth_log.append(event.record)
        report_growth(workdir, writer, event, state)
        check_finite(state)  # a checkpoint never holds a state that skipped a non-finite step
        ckpt.save(state, growth_log)  # a restart does not redo the event
        warm_up = warm_up_for(state, ahead[0]) if config.growth.slots == "events" else None

    state, metrics = compiled.fn(state, next(batches))
    step += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      check_finite(state)
      report_train(writer, steps_per_epoch, total_steps, step, metrics, lr=float(lr_schedule(step)),
                   num_params=num_params)
    progress(step)
    if step % eval_every == 0 or step == total_steps:
      with progress.timed("eval"):
        last_eval = evaluate(eval_step, state.variables, config, mesh)
      report_eval(writer, total_steps, step, last_eval)

    stop = step == stop_after_steps or ckpt.preempted(step)
    # A growth step is saved right after its growth instead.
    if stop or step == total_steps or (ckpt.due(step) and step not in events):
      check_finite(state)
      ckpt.save(state, growth_log)
    if stop:
      finish_writing(ckpt, writer)
      print(f"stopped at step {step}/{total_steps}, checkpoint saved: run the same command to "
            "resume", flush=True)
      return None

  check_finite(state)
  if not last_eval:  # resumed from the final checkpoint of a run killed before its summary
    last_eval = evaluate(eval_step, state.variables, config, mesh)
  units = (unit_ablation(model, eval_step, config, mesh, state.variables, last_eval)
           if growth_log else None)
  finish_writing(ckpt, writer)  # complete before summary.json marks the run finished
  return write_summary(workdir, info, state, last_eval, total_steps, base_params, growth_log,
                       unit_ablation=units, compiles=compile_log.since(compiled_before, PROGRAMS),
                       compute=compute.run_compute(growth_log, total_steps, compiled.flops),
                       resumed_from_step=start_step if restored else None,
                       wall_seconds=time.perf_counter() - run_start)


# ---------------------------------------------------------------------------- reporting

def report_start(config, info, base_params: int, total_steps: int, events: list[int],
                 compile_seconds: float, resumed_at: tuple[int, int] | None):
  """The run's first line; `resumed_at`: the step a resumed run starts at and its events done."""
  resumed = (f"; resumed at step {resumed_at[0]} with {resumed_at[1]} events done"
             if resumed_at else "")
  print(f"DeiT-{config.model.variant} on {info.name}: {base_params:,} params, {total_steps} steps, "
        f"{len(events)} growth events at steps {events}; train step compiled in "
        f"{compile_seconds:.1f}s{resumed}", flush=True)


def finish_writing(ckpt: checkpoint.Checkpointer, writer):
  """Waits for the checkpoint being written to complete and closes the metric writers."""
  ckpt.wait()
  writer.close()


def report_train(writer, steps_per_epoch: int, total_steps: int, step: int, metrics, *,
                 lr: float, num_params: int):
  """Prints and writes the train metrics (reading them waits for the devices: only at log
  steps)."""
  values = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "lr": lr,
            "params": num_params}
  writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
  print(f"step {step:>6}/{total_steps} | epoch {step / steps_per_epoch:6.2f} | loss "
        f"{values['loss']:.4f} | lr {lr:.2e}", flush=True)


def report_eval(writer, total_steps: int, step: int, result: dict):
  writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
  print(f"eval  {step:>6}/{total_steps} | top-1 {result['top1']:.2%} | top-5 "
        f"{result['top5']:.2%} | loss {result['loss']:.4f}", flush=True)


def report_growth(workdir: str, writer, event: growth_event.Event, state: TrainState):
  """Prints the event, writes its scalars and draws its figures."""
  print(growth_event.describe(event.record), flush=True)
  writer.write_scalars(event.record["step"], {
      f"growth/{k}": v for k, v in event.record.items()
      if isinstance(v, (int, float)) and k != "step"})
  plots.growth_event_figures(workdir, event.record["step"], event.spectrum, event.plan,
                             state.variables)


def finished_summary(workdir: str, ckpt: checkpoint.Checkpointer, total_steps: int) -> dict | None:
  """The summary of a run this workdir already finished, or None."""
  if ckpt.latest_step() != total_steps:
    return None
  summary = workdir_lib.read_summary(workdir)
  if summary is not None:
    print(f"{workdir} holds this run, finished ({total_steps} steps): nothing to do; "
          f"summary in {workdir_lib.summary_path(workdir)}", flush=True)
  return summary


def write_summary(workdir: str, info, state: TrainState, last_eval: dict, total_steps: int,
                  base_params: int, growth_log: list[dict], **extra) -> dict:
  """summary.json (which marks the run finished), the final figures and the closing lines."""
  architecture = spec.from_variables(state.variables)
  summary = {"dataset": info.name, "eval": last_eval, "params": spec.count_params(state.variables),
             "base_params": base_params, "steps": total_steps, "growth_events": growth_log,
             "architecture": architecture, "commit": workdir_lib.code_commit(), **extra}
  workdir_lib.write_summary(workdir, summary)
  plots.final_figures(workdir)
  print(f"\nfinal: top-1 {last_eval['top1']:.2%} (top-5 {last_eval['top5']:.2%}) on "
        f"{last_eval['count']} {info.name} test images; {summary['params']:,} params "
        f"({base_params:,} before growth)")
  if growth_log:
    print("grown layers:\n" + spec.describe(architecture))
    print(ablation.describe(summary["unit_ablation"]))
  print(compile_log.describe(summary["compiles"]))
  return summary


class NonFiniteError(FloatingPointError):
  pass


def check_finite(state: TrainState):
  bad = int(state.first_bad_step)
  if bad >= 0:
    raise NonFiniteError(f"loss or gradient was not finite at step {bad}; that step and the "
                         "ones after it were not applied, and no checkpoint holds them. Lower "
                         "optim.base_lr or check the data.")
