"""Orbax checkpoints of a (growing) training run (docs/method.md, "Checkpoints of a growing model").

    workdir.claim(path, config)            # first: refuses a workdir of another run
    ckpt = Checkpointer(path, config)
    restored = ckpt.restore(abstract_state)  # newest usable checkpoint, or None in a new workdir
    ckpt.save(state, growth_events)        # asynchronous; ckpt.preempted(step) after SIGTERM
    ckpt.close()

In <workdir>/checkpoints/<step>/ (the rest of the workdir's layout: workdir.py), four items:
  state             the TrainState: step (also the data position: train_batches(start_step=
                    step) resumes the stream exactly), params, growth, opt_state, rng
  architecture      spec.from_variables: the grown model, read before the state
  config            the run's config
  run               growth events so far (summary.json's list) and the state's checksums
Checkpoints that fail to restore are moved to <workdir>/corrupt_checkpoints/, out of the way of
the steps the resumed run saves again; nothing is deleted.

Safety. A checkpoint is written to a temporary directory and renamed when complete (orbax's
atomic rename), so a hard kill at any moment leaves the complete ones usable; a restart clears
the temporary directory. The state is restored into the abstract grown model rebuilt from the
architecture, its shapes are checked against the checkpoint's metadata, and its checksums
against those computed at save time (orbax reads some damaged files without an error). A
checkpoint that fails any of this is skipped with a warning for the previous one.
"""

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp

from hetscale_jax import spec
from hetscale_jax import workdir as workdir_lib
from hetscale_jax.workdir import CHECKPOINTS, CORRUPT, WorkdirError

_ITEMS = ("state", "architecture", "config", "run")


class CheckpointError(RuntimeError):
  """No checkpoint of the workdir could be restored."""


# ---------------------------------------------------------------------------- checksums

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_checksum(x):
  """Sum of the array's bits as uint32 words, each times an odd weight: changing any one word
  changes the sum, and so does moving values around."""
  x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x  # bitcast takes no bools
  words = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32).ravel()
  return jnp.sum(words * (2 * jnp.arange(words.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)


@jax.jit
def _tree_checksum(tree):
  # On the devices, so a sharded state is summed where it lives and only a scalar comes back.
  total = jnp.zeros([], jnp.uint32)
  for i, leaf in enumerate(jax.tree.leaves(tree)):
    total += _leaf_checksum(leaf) * jnp.uint32(2 * i + 1)
  return total


def checksums(fields: dict[str, Any]) -> dict[str, int]:
  """{name: checksum of its arrays} for {TrainState field name: its value}."""
  return {name: int(_tree_checksum(tree)) for name, tree in fields.items()}


def _fields(state) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


# ---------------------------------------------------------------------------- orbax

def _manager(directory: epath.Path, **options) -> ocp.CheckpointManager:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.handlers.StandardCheckpointHandler()
  registry.add("state", ocp.args.StandardSave, state_handler)
  registry.add("state", ocp.args.StandardRestore, state_handler)
  for item in _ITEMS[1:]:
    json_handler = ocp.handlers.JsonCheckpointHandler()
    registry.add(item, ocp.args.JsonSave, json_handler)
    registry.add(item, ocp.args.JsonRestore, json_handler)
  # Absolute: orbax's tensorstore writer refuses a relative path (main.py's default workdir).
  return ocp.CheckpointManager(directory.absolute(),
                               options=ocp.CheckpointManagerOptions(**options),
                               handler_registry=registry)


def _read_json_items(manager, step: int) -> tuple[dict, dict, dict]:
  """(architecture, config, run) of a checkpoint; the architecture's format is checked."""
  items = manager.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.JsonRestore() for item in _ITEMS[1:]}))
  architecture = spec.from_json(json.dumps(items["architecture"]))
  return architecture, items["config"], items["run"]


def _shapes(tree) -> dict[str, tuple]:
  """{path: shape} with dataclass fields, named-tuple fields, dict keys and list positions all
  spelt alike, so that a TrainState and its checkpoint metadata (nested dicts) compare."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in flat}


def _check_shapes(abstract, metadata):
  expected, stored = _shapes(abstract), _shapes(metadata)
  wrong = [f"{p}: checkpoint {stored.get(p)}, model {expected.get(p)}"
           for p in sorted(expected.keys() | stored.keys()) if expected.get(p) != stored.get(p)]
  if wrong:
    raise ValueError(f"the state does not match its architecture spec ({len(wrong)} arrays): "
                     + "; ".join(wrong[:5]))


def _verify(restored: dict[str, Any], expected: dict[str, int]):
  actual = checksums(restored)
  bad = [name for name in restored if actual[name] != expected[name]]
  if bad:
    raise ValueError(f"checksums of {bad} differ from those at save time: the data is damaged")


@dataclasses.dataclass
class Restored:
  state: Any
  growth_events: list[dict]


class Checkpointer:
  """The run's checkpoints in `workdir`/checkpoints: see the module docstring.

  The workdir must be claimed first (workdir.claim). Saves are
  asynchronous: orbax copies the arrays to host memory before `save` returns (its default,
  synchronous device-to-host transfer), so the train step may donate the state right after.
  In a single process, SIGTERM only sets a flag that `preempted` reports, so that the loop
  saves at a step boundary and exits cleanly; on several hosts orbax's preemption sync point
  (JAX's preemption service) makes every host stop at the same step.
  """

  def __init__(self, workdir: str, config):
    self._workdir = epath.Path(workdir)
    self._config = workdir_lib.config_dict(config)
    # cleanup_tmp_directories: removes what a save killed midway left behind.
    self._manager = _manager(self._workdir / CHECKPOINTS, max_to_keep=config.keep_checkpoints,
                             save_interval_steps=config.checkpoint_every_steps,
                             cleanup_tmp_directories=True)
    self._sigterm = False
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
    self._sigterm = True

  def preempted(self, step: int) -> bool:
    """True once the run should checkpoint at `step` and exit (SIGTERM, TPU preemption)."""
    return self._sigterm or self._manager.reached_preemption(step)

  def due(self, step: int) -> bool:
    """Whether `step` is one of the periodic checkpoints (config.checkpoint_every_steps) not
    yet saved, or one orbax's preemption sync point asks for."""
    return self._manager.should_save(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state, growth_events: list[dict]):
    """Starts an asynchronous save of `state` at its step, unless a checkpoint of that step or
    a later one exists. The caller makes sure the state is finite (train.check_finite)."""
    step = int(state.step)
    latest = self._manager.latest_step()
    if latest is not None and latest >= step:
      return
    run = {"growth_events": json.loads(json.dumps(growth_events, default=float)),
           "checksums": checksums(_fields(state))}
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        architecture=ocp.args.JsonSave(spec.from_variables(state.variables)),
        config=ocp.args.JsonSave(self._config),
        run=ocp.args.JsonSave(run)))

  def restore(self, abstract_state: Callable[[dict], Any]) -> Restored | None:
    """The newest checkpoint that restores and verifies, or None if there is none.

    abstract_state(architecture) -> the abstract TrainState (ShapeDtypeStructs with shardings)
    of the model grown as the architecture spec says. Raises WorkdirError for a checkpoint of
    another config or architecture, CheckpointError if checkpoints exist but none restores.
    """
    steps = self._manager.all_steps()
    step, restored = _newest_usable(steps, lambda step: self._restore_step(step, abstract_state))
    failed = [s for s in steps if step is None or s > step]
    if restored is not None and failed:
      self._move_aside(failed)
      logging.warning("resumed from step %d; the unusable checkpoints %s were moved to %s",
                      step, failed, self._workdir / CORRUPT)
    if restored is None and failed:
      raise CheckpointError(f"none of the checkpoints {failed} in {self._workdir / CHECKPOINTS} "
                            "could be restored (see the warnings above); nothing was moved")
    return restored

  def _restore_step(self, step: int, abstract_state) -> Restored:
    architecture, config, run = _read_json_items(self._manager, step)
    workdir_lib.refuse_other_config(f"checkpoint {step} in {self._workdir}", config, self._config)
    try:
      abstract = abstract_state(architecture)
    except ValueError as e:  # spec.abstract_variables: base widths differ from the model's
      raise WorkdirError(f"checkpoint {step} in {self._workdir}: {e}") from None
    _check_shapes(abstract, self._manager.item_metadata(step)["state"].tree)
    state = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    _verify(_fields(state), run["checksums"])
    return Restored(state, run["growth_events"])

  def _move_aside(self, steps: list[int]):
    """Moves failed checkpoints out of the way of the steps the resumed run saves again."""
    if jax.process_index() == 0:
      corrupt = self._workdir / CORRUPT
      corrupt.mkdir(exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        (self._workdir / CHECKPOINTS / str(step)).rename(corrupt / f"{step}-{stamp}")
    multihost_utils.sync_global_devices("hetscale_jax move_aside")
    self._manager.reload()

  def wait(self):
    """Blocks until the last save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the last save and puts back the SIGTERM handler it replaced."""
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------- reading a run

@dataclasses.dataclass
class Final:
  """The newest usable checkpoint of a workdir, as host arrays: what export writes."""
  step: int
  variables: dict        # {"params": ..., "growth": ...} of numpy arrays
  architecture: dict
  config: dict


def read_latest(workdir: str) -> Final:
  """The newest checkpoint whose variables restore and verify, onto this host, without the
  model code or the devices that wrote it; older ones are tried with a warning. Changes
  nothing in the workdir."""
  with _reader(workdir) as (manager, directory):
    steps = manager.all_steps()
    _, final = _newest_usable(steps, lambda step: _read_step(manager, step))
  if final is None:
    raise CheckpointError(f"none of the checkpoints {steps} in {directory} could be read")
  return final


@contextlib.contextmanager
def _reader(workdir: str):
  """(read-only manager, directory) of a workdir's checkpoints."""
  directory = epath.Path(workdir) / CHECKPOINTS
  if not directory.exists():
    raise CheckpointError(f"{workdir} holds no checkpoints ({directory} is missing)")
  manager = _manager(directory, read_only=True, create=False, save_interval_steps=0)
  try:
    yield manager, directory
  finally:
    manager.close()


def _newest_usable(steps, restore: Callable[[int], Any]) -> tuple[int | None, Any]:
  """(step, restore(step)) of the newest step whose restore succeeds, warning about each
  newer one that fails; (None, None) if none does. WorkdirError (another run's checkpoint)
  is no damage and propagates."""
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step)
    except WorkdirError:
      raise
    except Exception as e:  # orbax and tensorstore raise many kinds, some bare Exception
      logging.warning("checkpoint at step %d is unusable (%s: %s); trying the previous one",
                      step, type(e).__name__, e)
  return None, None


def _read_step(manager, step: int) -> Final:
  architecture, config, run = _read_json_items(manager, step)
  # Restored onto one local device whatever mesh wrote it: the metadata gives shapes and dtypes.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)["state"].tree)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  variables = {"params": state["params"], "growth": state["growth"]}
  _verify(variables, run["checksums"])
  return Final(step, jax.device_get(variables), architecture, config)
