"""Training with growth events: the DeiT recipe (DESIGN section 7) plus section 4's schedule.

    train_and_evaluate(config, workdir) -> final summary dict (None if stopped early)

At a growth event the next training batches serve as the probe (no extra iterations), the
spectrum is computed, neurons are selected and grown, the optimizer state is migrated and
the train step is compiled anew for the grown parameter tree.

Re-running on the same workdir resumes from its newest checkpoint, grown architecture included
(checkpoint.py): every N steps, after each growth event and on SIGTERM the state is saved.
"""

from collections.abc import Iterator
import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetscale_jax import (checkpoint, config_lib, grow, input_pipeline, optim, plots, sharding,
                          spec, writers)
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


def param_count(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------- model, optimizer

def create_model(config, info: input_pipeline.DatasetInfo):
  m = config.model
  overrides = {k: m[k] for k in ("width", "depth", "num_heads", "head_dim", "mlp_dim") if m[k] is not None}
  return deit.create(m.variant, num_classes=info.num_classes, img_size=info.image_shape[0],
                     patch_size=m.patch_size, drop_path_rate=m.drop_path_rate,
                     dtype=jnp.dtype(m.dtype), unit_activation=m.unit_activation, **overrides)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from warmup_lr, cosine to min_lr; peak lr scaled with the batch size."""
  o = config.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=o.warmup_lr, peak_value=o.base_lr * config.batch_size / 512,
      warmup_steps=int(o.warmup_epochs * steps_per_epoch),
      decay_steps=config.num_epochs * steps_per_epoch, end_value=o.min_lr)


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  o = config.optim
  return optim.adamw(learning_rate_schedule(config, steps_per_epoch), b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay)


# ---------------------------------------------------------------------------- losses, mixing

def soft_targets(labels, num_classes: int, smoothing: float):
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def _cutmix_mask(rng, height: int, width: int, lam):
  """Box of area about (1 - lam) at a uniform centre, clipped to the image (as timm)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(rng, (2,), 0, jnp.array([height, width]))
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = ((ys >= cy - cut_h // 2) & (ys < cy + cut_h - cut_h // 2)
            & (xs >= cx - cut_w // 2) & (xs < cx + cut_w - cut_w // 2))
  return inside


def mix_batch(rng, images, targets, mixup_config):
  """Mixup or CutMix of each example with its mirror in the batch (timm's batch mode).

  Returns mixed images and targets; lam is corrected to the clipped box area for CutMix.
  """
  c = mixup_config
  if c.prob == 0 or (c.mixup_alpha == 0 and c.cutmix_alpha == 0):
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  lam_mix = jax.random.beta(k_mix, c.mixup_alpha, c.mixup_alpha) if c.mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, c.cutmix_alpha, c.cutmix_alpha) if c.cutmix_alpha > 0 else 1.0
  if c.mixup_alpha > 0 and c.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < c.switch_prob
  else:
    use_cutmix = jnp.asarray(c.cutmix_alpha > 0)
  box = _cutmix_mask(k_box, images.shape[1], images.shape[2], lam_cut)
  lam_box = 1.0 - jnp.mean(box)
  flipped = images[::-1]
  cut = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  apply = jax.random.uniform(k_apply) < c.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  images = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images).astype(images.dtype)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def classification_sums(logits, labels, mask):
  """Summed loss (plain cross-entropy), top-1 and top-5 hits and count over unmasked rows."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
  rank = jnp.sum(logits > true_logit, axis=1)  # classes scored strictly above the label
  return {"loss": jnp.sum(loss * mask), "top1": jnp.sum((rank < 1) * mask),
          "top5": jnp.sum((rank < 5) * mask), "count": jnp.sum(mask)}


# ---------------------------------------------------------------------------- steps

def make_train_step(model, tx, config, num_classes: int):
  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    mix_rng, drop_rng = jax.random.split(step_rng)
    targets = soft_targets(batch["label"], num_classes, config.label_smoothing)
    images, targets = mix_batch(mix_rng, batch["image"], targets, config.mixup)

    def loss_fn(params):
      logits = model.apply({"params": params, "growth": state.growth}, images, train=True,
                           rngs={"dropout": drop_rng})
      return cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing; the host stops at its next check, naming the step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), first_bad_step=first_bad)
    return new_state, {"loss": loss, "grad_norm": grad_norm}
  return train_step


def make_eval_step(model):
  @jax.jit
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    return classification_sums(logits, batch["label"], batch["mask"])
  return eval_step


def make_probe_loss(model, num_classes: int, smoothing: float):
  """Deterministic training loss for the splitting probe: no drop-path, no mixing."""
  def probe_loss(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    return cross_entropy(logits, soft_targets(batch["label"], num_classes, smoothing))
  return probe_loss


def state_shardings(mesh, state):
  shardings = sharding.tree_shardings(mesh, state)
  rep = sharding.replicated(mesh)
  return shardings.replace(step=rep, rng=rep, first_bad_step=rep)


@dataclasses.dataclass
class CompiledStep:
  fn: Any
  shardings: Any
  seconds: float


def compile_train_step(train_step, mesh, state, batch) -> CompiledStep:
  """Ahead-of-time compile for this parameter tree (once at start, once per growth event)."""
  shardings = state_shardings(mesh, state)
  start = time.perf_counter()
  fn = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
               out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  compiled = fn.lower(state, batch).compile()
  return CompiledStep(compiled, shardings, time.perf_counter() - start)


def evaluate(eval_step, variables, config, mesh) -> dict:
  totals = None
  for local_batch in input_pipeline.eval_batches(config.data, global_batch_size=config.batch_size):
    sums = eval_step(variables, sharding.global_batch(mesh, local_batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = sharding.host_value(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count, "count": int(count)}


# ---------------------------------------------------------------------------- growth

def growth_event_steps(config, steps_per_epoch: int) -> list[int]:
  if not config.growth.enabled:
    return []
  return [int(round(e * steps_per_epoch)) for e in config.growth.epochs]


def event_budget(config, current_params: int, events_left: int) -> int:
  g = config.growth
  if g.budget_per_event > 0:
    return g.budget_per_event
  return max(g.target_params - current_params, 0) // events_left


def eigenvalue_summary(spectrum) -> dict:
  out = {}
  for path, s in spectrum.items():
    lam = np.asarray(s.eigvals) / float(s.input_scale)
    out[path] = {"min": float(lam.min()), "median": float(np.median(lam)),
                 "negative": float(np.mean(lam < 0)),
                 "max_residual": float(np.max(np.asarray(s.residuals)))}
  return out


def grow_state(config, model, tx, state: TrainState, probe, budget: int, num_classes: int):
  """One growth event on `state`; returns the grown state, the spectrum and the plan."""
  g = config.growth
  loss_fn = make_probe_loss(model, num_classes, config.label_smoothing)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), int(state.step))
  spectrum = grow.splitting_spectrum(loss_fn, state.variables, probe, num_iters=g.num_iters,
                                     rng=rng, method=g.method)
  spectrum = {p: s for p, s in sharding.host_value(spectrum).items() if p.rsplit("/", 1)[-1] in g.layers}
  plan = grow.select(spectrum, budget, g.threshold, rule=g.rule,
                     max_layer_fraction=g.max_layer_fraction, rng=config.seed + int(state.step))
  variables = grow.grow(state.variables, plan, spectrum, mode=g.mode, unit_scale=g.unit_scale)
  opt_state = grow.migrate_opt_state(tx, state.opt_state, variables["params"])
  grown = state.replace(params=variables["params"], growth=variables["growth"], opt_state=opt_state)
  return grown, spectrum, plan


def describe_event(step: int, plan: grow.Plan, eig: dict, before: int, after: int,
                   seconds_spectrum: float, seconds_compile: float) -> str:
  lines = [f"growth at step {step}: {before:,} -> {after:,} params (+{after - before:,}, rule "
           f"{plan.rule}); spectrum {seconds_spectrum:.1f}s, recompile {seconds_compile:.1f}s"]
  lines.append(f"  {'layer':<22}{'grown':>7}{'min lambda':>12}{'median':>11}{'neg':>6}")
  for path, e in eig.items():
    lines.append(f"  {path:<22}{plan.counts().get(path, 0):>7}{e['min']:>12.3g}"
                 f"{e['median']:>11.3g}{e['negative']:>6.0%}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- loop

def _format_seconds(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


def init_state(config, model, tx, info) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  params = model.init({"params": jax.random.fold_in(rng, 0)}, dummy, train=False)["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, growth={},
                    opt_state=tx.init(params), rng=jax.random.fold_in(rng, 1),
                    first_bad_step=jnp.full([], -1, jnp.int32))


def enable_compilation_cache(config):
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))


def train_and_evaluate(config, workdir: str, *, fresh: bool = False,
                       stop_after_steps: int | None = None) -> dict | None:
  """Trains (or resumes) the run of `config` in `workdir`; returns the final summary.

  Returns None if the run stopped early, with a checkpoint to resume from: on SIGTERM, or at
  `stop_after_steps` (a stop that leaves the config, hence the schedule, unchanged). Bad
  inputs and a workdir of another run are refused before anything is written. `fresh` starts
  a new run in a new sub-workdir of `workdir` if it holds anything (checkpoint.fresh_workdir).
  """
  config_lib.validate(config)
  info = input_pipeline.dataset_info(config.data)  # fails at once if the data is missing
  config_lib.check_against_data(config, info)
  config_lib.check_against_devices(config, jax.device_count())
  # Before anything compiles (choosing and claiming the workdir synchronise hosts): JAX sets
  # its persistent cache up at the first compilation and ignores a directory named later.
  enable_compilation_cache(config)
  if fresh:
    workdir = checkpoint.fresh_workdir(workdir)
    print(f"fresh run in {workdir} (to resume it: --workdir {workdir}, without --fresh)")
  with checkpoint.Checkpointer(workdir, config) as ckpt:
    return _train_and_evaluate(config, workdir, info, ckpt, stop_after_steps)


def _train_and_evaluate(config, workdir: str, info, ckpt: checkpoint.Checkpointer,
                        stop_after_steps: int | None) -> dict | None:
  steps_per_epoch = input_pipeline.steps_per_epoch(config.data, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  events = growth_event_steps(config, steps_per_epoch)
  summary_path = os.path.join(workdir, "summary.json")
  if ckpt.latest_step() == total_steps and os.path.exists(summary_path):
    print(f"{workdir} holds this run, finished ({total_steps} steps): nothing to do; "
          f"summary in {summary_path}", flush=True)
    with open(summary_path) as f:
      return json.load(f)

  mesh = sharding.make_mesh(config.mesh.fsdp)
  model = create_model(config, info)
  tx = create_optimizer(config, steps_per_epoch)
  train_step = make_train_step(model, tx, config, info.num_classes)
  eval_step = make_eval_step(model)
  writer = writers.MetricWriter(workdir)

  restored = ckpt.restore(functools.partial(abstract_state, config, model, tx, info, mesh))
  if restored is not None:
    state, growth_log = restored.state, restored.growth_events
  else:
    state, growth_log = init_state(config, model, tx, info), []
  state = jax.device_put(state, state_shardings(mesh, state))
  start_step = int(state.step)
  batches: Iterator = (sharding.global_batch(mesh, b) for b in input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step))
  first = next(batches)
  batches = itertools.chain([first], batches)
  compiled = compile_train_step(train_step, mesh, state, first)
  compiles = 1  # in this process: the restored (possibly grown) tree, then once per event
  base_params = growth_log[0]["params_before"] if growth_log else param_count(state.params)
  logging.info("model: %s params, %d steps (%d/epoch), %d devices, mesh %s", f"{base_params:,}",
               total_steps, steps_per_epoch, jax.device_count(), dict(mesh.shape))
  print(f"DeiT-{config.model.variant} on {info.name}: {base_params:,} params, {total_steps} steps, "
        f"{len(events)} growth events at steps {events}; train step compiled in {compiled.seconds:.1f}s"
        + (f"; resumed at step {start_step} with {len(growth_log)} events done"
           if restored is not None else ""),
        flush=True)

  last_eval = {}
  window_start, window_step = time.perf_counter(), int(state.step)
  run_start = time.perf_counter()
  metrics = None
  while int(state.step) < total_steps:
    step = int(state.step)
    if step in events[len(growth_log):]:  # a resumed run restored the earlier events grown
      probe = list(itertools.islice(batches, config.growth.probe_batches))
      batches = itertools.chain(probe, batches)
      before = param_count(state.params)
      t0 = time.perf_counter()
      state, spectrum, plan = grow_state(
          config, model, tx, state, probe if len(probe) > 1 else probe[0],
          event_budget(config, before, len(events) - events.index(step)), info.num_classes)
      seconds_spectrum = time.perf_counter() - t0
      compiled = compile_train_step(train_step, mesh, state, probe[0])
      compiles += 1
      state = jax.device_put(state, compiled.shardings)
      after = param_count(state.params)
      eig = eigenvalue_summary(spectrum)
      print(describe_event(step, plan, eig, before, after, seconds_spectrum, compiled.seconds), flush=True)
      record = {"params_before": before, "params_after": after, "plan_params": plan.num_params,
                "grown": plan.counts(),
                "rule": plan.rule, "seconds_spectrum": seconds_spectrum,
                "seconds_compile": compiled.seconds, "eigenvalues": eig}
      growth_log.append({"step": step, **record})
      writer.write("growth", step, record)
      plots.growth_event_figures(workdir, step, spectrum, plan, spec.from_variables(state.variables))
      check_finite(state)  # a checkpoint never holds a state that skipped a non-finite step
      ckpt.save(state, growth_log)  # a restart does not redo the event
      window_start = time.perf_counter()  # growth time is not training throughput

    state, metrics = compiled.fn(state, next(batches))
    step += 1

    if step % config.log_every_steps == 0 or step == total_steps:
      check_finite(state)
      now = time.perf_counter()
      rate = (step - window_step) / max(now - window_start, 1e-9)
      lr = float(learning_rate_schedule(config, steps_per_epoch)(step))
      values = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "lr": lr, "steps_per_s": rate, "images_per_s": rate * config.batch_size,
                "params": param_count(state.params)}
      writer.write("train", step, values)
      print(f"step {step:>6}/{total_steps} | epoch {step / steps_per_epoch:6.2f} | loss "
            f"{values['loss']:.4f} | lr {lr:.2e} | {values['images_per_s']:,.0f} img/s | "
            f"ETA {_format_seconds((total_steps - step) / max(rate, 1e-9))}", flush=True)
      window_start, window_step = now, step

    if step % eval_every == 0 or step == total_steps:
      last_eval = evaluate(eval_step, state.variables, config, mesh)
      writer.write("eval", step, last_eval)
      print(f"eval  {step:>6}/{total_steps} | top-1 {last_eval['top1']:.2%} | top-5 "
            f"{last_eval['top5']:.2%} | loss {last_eval['loss']:.4f}", flush=True)

    stop = step == stop_after_steps or ckpt.preempted(step)
    # A growth step is saved right after its growth instead.
    if stop or step == total_steps or (ckpt.due(step) and step not in events):
      check_finite(state)
      ckpt.save(state, growth_log)
    if stop:
      ckpt.wait()
      writer.close()
      print(f"stopped at step {step}/{total_steps}, checkpoint saved: run the same command to "
            "resume", flush=True)
      return None

  check_finite(state)
  if not last_eval:  # resumed from the final checkpoint of a run killed before its summary
    last_eval = evaluate(eval_step, state.variables, config, mesh)
  ckpt.wait()  # summary.json marks a finished run: its final checkpoint must be complete
  architecture = spec.from_variables(state.variables)
  summary = {"dataset": info.name, "eval": last_eval, "params": param_count(state.params),
             "base_params": base_params, "steps": total_steps, "train_step_compiles": compiles,
             "resumed_from_step": start_step if restored is not None else None,
             "wall_seconds": time.perf_counter() - run_start, "growth_events": growth_log,
             "architecture": architecture}
  if jax.process_index() == 0:
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=1, default=float)
  writer.close()
  plots.final_figures(workdir)
  print(f"\nfinal: top-1 {last_eval['top1']:.2%} (top-5 {last_eval['top5']:.2%}) on "
        f"{last_eval['count']} {info.name} test images; {summary['params']:,} params "
        f"({base_params:,} before growth)")
  if growth_log:
    print("grown layers:\n" + spec.describe(architecture))
  return summary


class NonFiniteError(FloatingPointError):
  pass


def check_finite(state: TrainState):
  bad = int(state.first_bad_step)
  if bad >= 0:
    raise NonFiniteError(f"loss or gradient was not finite at step {bad}; that step and the "
                         "ones after it were not applied, and no checkpoint holds them. Lower "
                         "optim.base_lr or check the data.")
