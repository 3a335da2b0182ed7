"""One growth event of a training run: spectrum, plan, grown variables, migrated optimizer.

    steps = event_steps(config, steps_per_epoch)
    weights = train.event_weights(config, lr_schedule, steps)   # budget_weights of each event
    state, event = grow_state(config, model, tx, state, next_batches, weights_left=weights[i:],
                              num_classes=10, model_input=...,
                              peak_lr=train.peak_learning_rate(config))
    print(describe(event.record))

The probe is the next growth.probe_batches training batches (no extra data), scored with the
deterministic training loss: no drop-path and no mixing, so that every Lanczos product sees
the same operator (docs/design.md, "A growth event, step by step"). Only the layer kinds named
in config.growth.layers are scored at all. The caller recompiles the train step for the grown
tree and adds the compile time to the record.

Given `held_aside` batches (never trained on), the event can also measure, on copies, each
with the same deterministic loss:
  * growth.measure_split: the criterion itself. The chosen neurons grown with gated units in
    split mode instead (|a| = 1, downhill), at the small growth.split_check_scale where the
    second-order prediction holds, change the loss by about -1/2 |r^T S r| each
    (docs/method.md, "The unit"); the record keeps that prediction and the measured change
    on the probe and on the held-aside batches, each per added parameter.
  * growth.unit_only_steps > 0: unit-only training (unit_only.py). The event's new units
    alone, base frozen, train for that many Adam steps at the run's peak learning rate on
    the next training batches; the record keeps the held-aside loss before and after, and
    its drop per added parameter.

With growth.perturbation > 0 the first event then perturbs every parameter (`perturb`): the
noise-floor variant, whose picks at that event are those of the same run unperturbed.
"""

from collections.abc import Callable
import dataclasses
import threading
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax import compile_log, grow, layers, losses, sharding, spec, unit_only
from hetscale_jax.layers import GROWTH_COLLECTION


@dataclasses.dataclass(frozen=True)
class Event:
  spectrum: dict           # {layer path: splitting.Spectrum} as host arrays
  plan: grow.Plan
  record: dict             # what summary.json, metrics and checkpoints keep of the event


def event_steps(config, steps_per_epoch: int) -> list[int]:
  """The steps at which the run grows: config.growth.epochs in steps (none if disabled)."""
  if not config.growth.enabled:
    return []
  return [int(round(e * steps_per_epoch)) for e in config.growth.epochs]


def budget_weights(growth_config, relative_lrs: list[float]) -> list[float]:
  """Each event's weight in sharing the parameters left to the target: equal, or ("lr", as
  released) its relative_lrs entry, the learning rate at its step over the peak one."""
  if growth_config.budget_weights == "lr":
    return list(relative_lrs)
  return [1.0] * len(relative_lrs)


def event_budget(growth_config, current_params: int, weights_left: list[float]) -> int:
  """Parameters this event may add: the fixed budget, or its weight's share of what is left to
  the target (weights_left: this event's weight, then those of the events after it), so that
  the last event ends at the target."""
  if growth_config.budget_per_event > 0:
    return growth_config.budget_per_event
  left = max(growth_config.target_params - current_params, 0)
  return int(left * weights_left[0] / sum(weights_left))


def eigenvalue_summary(spectrum) -> dict:
  """Per layer: the smallest and median normalised eigenvalue, the share of negative ones and
  the largest Lanczos residual."""
  out = {}
  for path, s in spectrum.items():
    lam = np.asarray(s.eigvals) / float(s.input_scale)
    out[path] = {"min": float(lam.min()), "median": float(np.median(lam)),
                 "negative": float(np.mean(lam < 0)),
                 "max_residual": float(np.max(np.asarray(s.residuals)))}
  return out


def probe_loss(model, num_classes: int, smoothing: float, model_input: Callable):
  """The training loss without its noise: no drop-path, no mixing (label smoothing kept)."""
  def loss_fn(variables, batch):
    logits = model.apply(variables, model_input(batch["image"]), train=False)
    return losses.cross_entropy(logits, losses.soft_targets(batch["label"], num_classes, smoothing))
  return loss_fn


def eligible(layer_kinds: tuple[str, ...]) -> Callable[[str], bool]:
  """The layer filter of the spectrum: a layer path ends in one of the eligible kinds (the
  spectrum keys its programs by the layers a filter keeps, so a new function compiles
  nothing)."""
  return lambda path: path.rsplit("/", 1)[-1] in layer_kinds


def scheduled_slots(config, variables):
  """`variables` with, if growth.slots is "schedule", the unit slots of every event of the run
  held from the start (grow.reserve_slots on the eligible layers); unchanged otherwise."""
  g = config.growth
  if not g.enabled or g.slots != "schedule":
    return variables
  return grow.reserve_slots(variables, len(g.epochs), g.unit, g.max_layer_fraction,
                            eligible(tuple(g.layers)))


def event_spectrum(config, loss_fn, variables, probe: list, step: int):
  """The spectrum a growth event at `step` scores `variables` by, on the probe batches. It
  computes on whole depth lists (layers.whole_lists): it runs once per event, so a program
  without the train step's choice of prefixes compiles faster, and with slots held from the
  start one program serves every event; the warm-up thread compiles it while training goes on."""
  g = config.growth
  variables = layers.whole_lists(variables)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)  # eager: not the spectrum's
  with compile_log.program("spectrum"):
    return grow.splitting_spectrum(
        loss_fn, variables, probe if len(probe) > 1 else probe[0], num_iters=g.num_iters,
        rng=rng, method=g.method, layer_filter=eligible(tuple(g.layers)))


def warm_up_spectrum(config, model, state, batch, *, num_classes: int,
                     model_input: Callable) -> threading.Thread:
  """A started thread that computes, on a copy of `state`, the spectrum a growth event would
  (probe: growth.probe_batches copies of `batch`), so that its programs compile while training
  goes on: the next event scores the model with the shapes `state` has (between events nothing
  changes them), and finds its spectrum compiled. Join it before an event, so that the two
  never compile the same program at once. One process only: on several, the thread's programs
  and the train steps could start in another order on each, and their collectives would wait
  for each other."""
  # A copy: the train step donates the state's buffers while the thread reads them.
  variables = {"params": jax.tree.map(jnp.copy, state.params),
               GROWTH_COLLECTION: sharding.host_value(state.growth)}
  loss_fn = probe_loss(model, num_classes, config.label_smoothing, model_input)
  probe, step = [batch] * config.growth.probe_batches, int(state.step)

  def run():
    try:
      jax.block_until_ready(event_spectrum(config, loss_fn, variables, probe, step))
    except Exception as e:  # the event then compiles the spectrum itself  # pylint: disable=broad-except
      logging.warning("warming up the spectrum failed (%s: %s); the first growth event will "
                      "compile it", type(e).__name__, e)
  # Not a daemon: a run that stops before its first event (SIGTERM) exits after the thread
  # ends, since XLA aborts the process when a daemon thread dies inside a compile.
  thread = threading.Thread(target=run, name="warm_up_spectrum")
  thread.start()
  return thread


def split_check(loss_fn, variables, spectrum, plan: grow.Plan, unit_scale: float,
                batches: dict[str, list]) -> dict:
  """Per added parameter: the predicted loss change of growing the plan's neurons as gated
  units in split mode and the measured one on each named list of batches (their mean loss)."""
  gated = dataclasses.replace(plan, unit="gated",
                              num_params=grow.plan_params(plan.indices, "gated", spectrum))
  split = grow.grow(variables, gated, spectrum, mode="split", unit_scale=unit_scale)
  per_param = max(gated.num_params, 1)
  out = {"predicted": grow.predicted_split_change(plan, spectrum, unit_scale) / per_param}
  for name, batch_list in batches.items():
    out[name] = (unit_only.mean_loss(loss_fn, split, batch_list)
                 - unit_only.mean_loss(loss_fn, variables, batch_list)) / per_param
  return out


def perturb(params, relative_size: float, rng: jax.Array):
  """Every parameter entry p as p (1 + relative_size N(0, 1)), independently: a change of
  relative_size of each entry's own size, however the units are stored, that leaves zeros at
  zero (so a new gated unit still starts at a = 0)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return treedef.unflatten([p * (1 + relative_size * jax.random.normal(key, p.shape, p.dtype))
                            for p, key in zip(leaves, keys)])


def grow_state(config, model, tx, state, next_batches: list, *, weights_left: list[float],
               num_classes: int, model_input: Callable, peak_lr: float,
               held_aside: list | None = None):
  """`state` grown at its step by config.growth, scored on the probe (the first
  growth.probe_batches of `next_batches`, the training batches the run sees next); weights_left
  as event_budget takes them (this event's weight, then those of the events after it: all of
  growth.epochs' at the first event, which alone is perturbed by growth.perturbation). With
  `held_aside` batches, the measures of the module docstring that config.growth asks for:
  unit-only training takes the first growth.unit_only_steps of `next_batches`, at `peak_lr`.

  Returns (grown state, Event). The state is any flax struct with step, params, growth and
  opt_state fields (train.TrainState).
  """
  g = config.growth
  probe = next_batches[:g.probe_batches]
  step = int(state.step)
  # The slots' places are read on the host, once, to count and add units (also multi-host).
  variables = {"params": state.params, GROWTH_COLLECTION: sharding.host_value(state.growth)}
  before = spec.count_params(variables)
  start = time.perf_counter()
  loss_fn = probe_loss(model, num_classes, config.label_smoothing, model_input)
  spectrum = sharding.host_value(event_spectrum(config, loss_fn, variables, probe, step))
  plan = grow.select(spectrum, budget=event_budget(g, before, weights_left), threshold=g.threshold,
                     rule=g.rule, unit=g.unit, allocation=g.allocation,
                     max_layer_fraction=g.max_layer_fraction,
                     min_candidates=g.min_candidates, max_layers_per_kind=g.max_layers_per_kind,
                     rng=jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step))
  record = {"step": step, "params_before": before, "plan_params": plan.num_params,
            "grown": plan.counts(), "rule": plan.rule, "unit": plan.unit,
            "seconds_spectrum": time.perf_counter() - start,
            "eigenvalues": eigenvalue_summary(spectrum)}
  if held_aside and g.measure_split:
    record["split_check"] = split_check(loss_fn, variables, spectrum, plan, g.split_check_scale,
                                        {"probe": probe, "check": held_aside})
  # No room for the events to come: each depth lists exactly its units, so the train step
  # compiles again after every event whatever room the packs held (slots held from the start,
  # growth.slots "schedule", are the way to one program).
  grown_variables = grow.grow(variables, plan, spectrum, mode=g.mode, unit_scale=g.unit_scale)
  params = grown_variables["params"]
  if g.perturbation > 0 and len(weights_left) == len(g.epochs):  # the first event
    params = perturb(params, g.perturbation,
                     jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), step))
    record["perturbation"] = g.perturbation
  grown = state.replace(params=params, growth=grown_variables[GROWTH_COLLECTION],
                        opt_state=grow.migrate_opt_state(tx, state.opt_state, params))
  record["params_after"] = spec.count_params(grown.variables)
  if held_aside and g.unit_only_steps > 0:
    start = time.perf_counter()
    record["unit_only"] = unit_only.measure(
        loss_fn, variables, grown.variables, next_batches[:g.unit_only_steps], held_aside,
        peak_lr, record["params_after"] - before)
    record["seconds_unit_only"] = time.perf_counter() - start
  return grown, Event(spectrum, plan, record)


def describe(record: dict) -> str:
  """The event as printed: sizes and timings, then one line per scored layer."""
  lines = [f"growth at step {record['step']}: {record['params_before']:,} -> "
           f"{record['params_after']:,} params (+{record['params_after'] - record['params_before']:,}"
           f", rule {record['rule']}, {record['unit']} units); spectrum {record['seconds_spectrum']:.1f}s, recompile "
           f"{record['seconds_compile']:.1f}s"]
  lines.append(f"  {'layer':<22}{'grown':>7}{'min lambda':>12}{'median':>11}{'neg':>6}")
  for path, e in record["eigenvalues"].items():
    lines.append(f"  {path:<22}{record['grown'].get(path, 0):>7}{e['min']:>12.3g}"
                 f"{e['median']:>11.3g}{e['negative']:>6.0%}")
  return "\n".join(lines)
