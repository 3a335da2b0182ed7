"""What the train-step and recompile benchmarks share: the machine line, synthetic inputs,
states built as training builds them, growth by a random plan, and interleaved timing."""

import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from hetscale_jax import datasets, grow, input_pipeline, sharding, splitting, train

# Classes of the datasets whose files a benchmark machine may lack (digits ships inside).
NUM_CLASSES = {"cifar100": 100, "imagenet100": 100}


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def machine() -> str:
  """One paragraph naming the hardware, the load and the versions the figures depend on."""
  devices = jax.devices()
  cores = len(os.sched_getaffinity(0))
  return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); CPU "
          f"{cpu_model()}, {cores} cores available, load average {os.getloadavg()[0]:.2f} at "
          f"the start (other work on the machine skews timings); python "
          f"{platform.python_version()}, jax {jax.__version__}, jaxlib "
          f"{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"numpy {np.__version__}")


def dataset_info(config) -> input_pipeline.DatasetInfo:
  """The model-facing shape of the config's data, also where the data is not on disk."""
  try:
    return input_pipeline.dataset_info(config.data)
  except input_pipeline.DatasetNotFoundError:
    size = config.data.image_size
    return input_pipeline.DatasetInfo(config.data.name, NUM_CLASSES[config.data.name],
                                      (size, size, 3), config.batch_size, config.batch_size)


def synthetic_batch(config, info, seed: int = 0) -> dict:
  """A batch as the input pipelines yield it: uint8 pixels in the dataset's range (digits to
  16, the others to 255), so that the normalised inputs are of the real data's scale."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size,) + tuple(info.image_shape)
  return {"image": rng.integers(0, datasets.max_pixel(info.name) + 1, shape, dtype=np.uint8),
          "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32)}


class Trainer:
  """The config's model, optimizer and train step, built by train.py's own functions."""

  def __init__(self, config, info, model=None):
    self.config, self.info = config, info
    self.model = model or train.create_model(config, info)
    self.tx = train.create_optimizer(config, steps_per_epoch=100)
    self.train_step = train.make_train_step(self.model, self.tx, config, info.num_classes)
    self.mesh = sharding.make_mesh(config.mesh.fsdp)

  def init_state(self) -> train.TrainState:
    return train.init_state(self.config, self.model, self.tx, self.info)

  def compile(self, state, batch) -> train.CompiledStep:
    return train.compile_train_step(self.train_step, self.mesh, state,
                                    sharding.global_batch(self.mesh, batch))

  def place(self, state, compiled, batch):
    """A private copy of `state` (the step donates it, and states of several candidates share
    arrays) in the compiled step's shardings, and the batch on the mesh."""
    state = jax.device_put(jax.tree.map(jnp.copy, state), compiled.shardings)
    return state, sharding.global_batch(self.mesh, batch)


def random_spectrum(variables, layer_kinds, seed: int) -> dict:
  """A Spectrum of the right shapes for every eligible layer; its values are random, which is
  all a benchmark of compute or compile time needs."""
  return splitting.random_spectrum(variables, seed, lambda path: grow.layer_kind(path) in layer_kinds)


def grow_state(trainer: Trainer, state, plan, spectrum, reserve_events: int = 0):
  """state with the plan's units added (packs sized for `reserve_events` more events, unless
  the state holds slots already) and its optimizer state migrated, as train.py does."""
  variables = grow.grow(state.variables, plan, spectrum, mode="exact", reserve_events=reserve_events)
  opt_state = grow.migrate_opt_state(trainer.tx, state.opt_state, variables["params"])
  return state.replace(params=variables["params"], growth=variables["growth"], opt_state=opt_state)


def with_variables(trainer: Trainer, state, variables):
  """state with `variables` (params and growth) and a fresh optimizer state for them."""
  return state.replace(params=variables["params"], growth=variables.get("growth", {}),
                       opt_state=trainer.tx.init(variables["params"]))


def with_slots(config, slots: str):
  """The config with growth.slots set to `slots`, whatever its own policy: "events" for a model
  that starts as plain GrowableDense layers, "schedule" for one holding every slot."""
  config = config.copy_and_resolve_references()
  config.growth.slots = slots
  return config


def timed(fn, *args):
  """(result, seconds) of fn(*args), its arrays computed."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def seconds_per_step(compiled, state, batch, steps: int):
  """Runs `steps` steps from `state`; returns (seconds per step, the state after)."""
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled.fn(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps, state


def interleaved_times(candidates: dict, steps: int, rounds: int) -> dict[str, list[float]]:
  """{name: [seconds per step in each round]} for candidates {name: (compiled, state, batch)},
  timed in turn within each round so that drifting machine load hits them alike. One untimed
  round first warms every candidate up."""
  states = {}
  times = {name: [] for name in candidates}
  for r in range(rounds + 1):
    for name, (compiled, state, batch) in candidates.items():
      seconds, states[name] = seconds_per_step(compiled, states.get(name, state), batch, steps)
      if r:
        times[name].append(seconds)
  return times


def ratio_line(name: str, times: dict, candidate: str, baseline: str, target: float) -> str:
  """The median of the per-round ratios candidate / baseline (judged against the target),
  their range, and the ratio of the two fastest rounds (the least disturbed by other work)."""
  ratios = [c / b for c, b in zip(times[candidate], times[baseline])]
  median = statistics.median(ratios)
  fastest = min(times[candidate]), min(times[baseline])
  return (f"{name}: {median:.3f}x, median of {len(ratios)} rounds (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}); fastest rounds {fastest[0] * 1e3:.2f} vs {fastest[1] * 1e3:.2f} "
          f"ms/step = {fastest[0] / fastest[1]:.3f}x; target <= {target:.2f}x: "
          f"{'met' if median <= target else 'NOT met'}")
