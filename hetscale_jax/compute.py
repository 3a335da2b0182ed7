"""A run's compute, measured: XLA's FLOPs of the programs it ran, times how often it ran them.

    step_flops = compute.program_flops(compiled) * jax.device_count()   # one train step
    event.record["work_flops"] = compute.event_work(...)                  # at a growth event
    summary["compute"] = compute.run_compute(growth_log, total_steps, step_flops)

summary["compute"] holds
  train_flops      the training FLOPs: the sum over `train`
  train            one entry per architecture the run trained: {"from_step", "to_step",
                   "step_flops"}, the steps it trained and its compiled train step's FLOPs
                   (all devices), from the growth events' records and the last program
  event_flops      the sum over `events`
  events           per growth event, {"step", "spectrum", "split_check", "unit_only"}: the
                   FLOPs of the event's own work (0 for a measure the config does not ask
                   for), and "seconds": the wall time its measuring took (in the run's)

What the counts are. XLA's cost analysis counts what a program computes, elementwise work
included, and (a limit of the analysis) the body of a loop once whatever its trip count, and
the largest branch of a conditional (a switch of 0, 1 and 2 matmuls counts 2). So:
  * a train step of slots sized at events (growth.slots "events", every study) is counted
    exactly; with slots held from the start ("schedule") its run-time choice of prefix is a
    conditional, and every step counts as the largest prefix: an upper bound;
  * spectrum: the spectrum's program(s) lowered together: the probe's statistics pass
    (forward and backward over the probe) exactly, the Lanczos solve's loops once, i.e. one
    iteration of growth.num_iters (with growth.method "streamed", whose every iteration
    reruns the model, far below the truth): a lower bound;
  * split_check: the loss on the probe and the held-aside batches, once before and once
    after growing, each forward counted as the ungrown and the grown model's (the split copy
    grows the same neurons, but with gated units where the run's are linear); the grown copy
    itself (grow.grow, eager arithmetic) is not counted;
  * unit_only: one unit-only step (its scan over one batch) times growth.unit_only_steps,
    plus the held-aside loss before and after; choosing its slots (host work) is not counted.
Event work is measured by lowering its programs anew (tracing, no compiling: a second or two
per event on the study's model, within the run's wall time), so only in runs that measure
their events (growth.measure_split or growth.unit_only_steps: the study's); elsewhere, and in
a run resumed from the checkpoint of an earlier version, the counts its records lack are None.
"""

from collections.abc import Callable
import time

import jax

from hetscale_jax import growth_event, unit_only


def program_flops(program) -> float:
  """FLOPs of a lowered or compiled program by XLA's cost analysis (per device for a
  partitioned program). Older jax versions give one analysis per program in a list."""
  analysis = program.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def lowered_flops(fn: Callable, *args) -> float:
  """program_flops of `fn` jitted and lowered on `args` (traced, not compiled), on all
  devices: a program lowered here is not partitioned, so it counts them all."""
  return program_flops(jax.jit(fn).lower(*args))


def event_work(config, loss_fn: Callable, before, after, next_batches: list,
               held_aside: list | None, learning_rate: float, step: int) -> dict:
  """The FLOPs of a growth event's own work (module docstring) at `step`, from the variables
  `before` and `after` it, the batches it was given (growth_event.grow_state's) and its probe
  loss_fn; the measures config.growth does not ask for count 0."""
  g = config.growth
  start = time.perf_counter()
  probe = next_batches[:g.probe_batches]
  work = {"step": step, "split_check": 0.0, "unit_only": 0.0,
          "spectrum": lowered_flops(
              lambda v, b: growth_event.event_spectrum(config, loss_fn, v, b, step), before, probe)}
  if held_aside:
    work |= held_aside_work(config, loss_fn, before, after, next_batches, held_aside, learning_rate)
  return work | {"seconds": time.perf_counter() - start}


def held_aside_work(config, loss_fn: Callable, before, after, next_batches: list, held_aside: list,
                    learning_rate: float) -> dict:
  """event_work's split_check and unit_only, where config.growth asks for them."""
  g = config.growth
  probe, work = next_batches[:g.probe_batches], {}
  forward_after = lowered_flops(loss_fn, after, probe[0])
  if g.measure_split:
    work["split_check"] = (len(probe) + len(held_aside)) * (
        lowered_flops(loss_fn, before, probe[0]) + forward_after)
  if g.unit_only_steps > 0:
    trainable = unit_only.new_slots(before, after)
    one_step = lowered_flops(lambda v, b: unit_only.train(loss_fn, v, trainable, [b], learning_rate),
                             after, next_batches[0])
    work["unit_only"] = g.unit_only_steps * one_step + 2 * len(held_aside) * forward_after
  return work


def run_compute(growth_log: list[dict], total_steps: int, last_step_flops: float) -> dict:
  """summary["compute"] (module docstring) of a run that trained `total_steps` steps: each
  event's record holds the train-step FLOPs of the architecture trained up to it
  ("step_flops_before") and, in a run that measures its events, its own work ("work_flops");
  `last_step_flops` are those of the train step after the last event (of the whole run, if it
  never grew). A count the records lack (events recorded by an earlier version, or work not
  measured) is None."""
  bounds = [0] + [e["step"] for e in growth_log] + [total_steps]
  step_flops = [e.get("step_flops_before") for e in growth_log] + [last_step_flops]
  train = [{"from_step": a, "to_step": b, "step_flops": f}
           for a, b, f in zip(bounds, bounds[1:], step_flops)]
  events = [e.get("work_flops") for e in growth_log]
  work = lambda e: e["spectrum"] + e["split_check"] + e["unit_only"]
  return {"train_flops": (None if None in step_flops else
                          sum((t["to_step"] - t["from_step"]) * t["step_flops"] for t in train)),
          "train": train, "events": events,
          "event_flops": None if None in events else sum(map(work, events))}
