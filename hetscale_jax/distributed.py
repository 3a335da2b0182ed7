"""Joins a multi-process run when the launcher asks for one (docs/method.md, "Scale").

    distributed.maybe_initialize()  # first thing in main, before anything touches a device

A run of several processes (one per TPU VM worker, or per GPU host or GPU under SLURM / Open
MPI) needs `jax.distributed.initialize()` before any device is used: it joins the processes
into one set of global devices and starts the coordination service that orbax checkpoints
rely on. On those platforms JAX finds the coordinator and the process ids itself. Anywhere
else a launcher names them in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
A plain single-process run (a laptop, a multi-GPU host) initializes nothing.
"""

import atexit
from collections.abc import Mapping
import os
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
import numpy as np

try:  # private: JAX has no public "is this a Cloud TPU VM"; see on_cloud_tpu_vm
  from jax._src import cloud_tpu_init as _cloud_tpu_init
except ImportError:
  _cloud_tpu_init = None


def launcher(environ: Mapping[str, str], on_cloud_tpu: bool) -> str | None:
  """Which launcher started this process as one of several, or None for a lone process.

  SLURM and Open MPI count only with more than one task: a single task may own every GPU of
  its host, which jax's SLURM detection would narrow to one. A Cloud TPU VM always counts:
  initializing is harmless on one worker and needed on a pod slice.
  """
  if "JAX_COORDINATOR_ADDRESS" in environ:
    return "explicit"
  if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in environ:
    return "slurm"  # inside srun: a step, not just an allocation
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if on_cloud_tpu:
    return "cloud_tpu"
  return None


def on_cloud_tpu_vm() -> bool:
  """Whether jax found TPU chips on the PCI bus when it was imported: the test jax's own cluster
  detection uses, and one that needs neither a device nor the network. A jax that moved this
  private flag gives False: a pod slice then joins through the launcher variables
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
  return bool(getattr(_cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_arguments(environ: Mapping[str, str]) -> dict:
  """The process count and id a launcher named; jax detects whatever is not named (and reads
  JAX_COORDINATOR_ADDRESS itself)."""
  names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
  return {arg: int(environ[name]) for arg, name in names.items() if name in environ}


# How long the coordination service waits for a silent process before it stops the others
# (JAX's default is 100 s), and how long a process may go without beating before the others
# take it for lost and end themselves: the watchdog's bound comes first.
HEARTBEAT_TIMEOUT_SECONDS = 30
LOST_AFTER_SECONDS = 10
_BEAT_KEY = "hetscale_jax/beat/"
_BEAT_SECONDS = 0.5
# A process's last beat, set as it exits: the others never take it for lost, since JAX's
# shutdown waits for them all and its own heartbeat covers a process that dies there.
_EXITED = "exited"
_exiting = threading.Event()
WATCHDOG_THREAD = "hetscale_jax watchdog"


def maybe_initialize(environ: Mapping[str, str] | None = None) -> str | None:
  """Initializes jax.distributed if this is one process of several, and starts its watchdog;
  returns the launcher."""
  environ = os.environ if environ is None else environ
  kind = launcher(environ, on_cloud_tpu_vm())
  if kind is not None:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
                               **initialize_arguments(environ))
    watchdog = threading.Thread(target=_watchdog, daemon=True, name=WATCHDOG_THREAD)
    watchdog.start()
    atexit.register(_stop_watchdog, watchdog)  # registered after JAX's shutdown: runs before it
  return kind


def _stop_watchdog(watchdog: threading.Thread):
  """Ends the watchdog before JAX shuts down. A daemon thread still inside a jaxlib call when
  the interpreter finalizes is ended there by Python, through C++ frames that abort the
  process (SIGABRT): a run that finished would exit as if it had crashed."""
  _exiting.set()
  watchdog.join(LOST_AFTER_SECONDS)


def _watchdog():
  """Beats in the coordination service's key-value store and watches the others' beats.

  When another process stops beating, ends this one with one line naming it. Wherever this
  process waits for the lost one (a collective, a barrier, a checkpoint's commit), it would
  otherwise wait until the coordination service gives the lost one up, and end without
  saying which process was lost or what to do.
  """
  client = jax_distributed.global_state.client  # private: JAX exposes its store nowhere else
  me = jax.process_index()
  others = [i for i in range(jax.process_count()) if i != me]
  changed = {i: (None, time.monotonic()) for i in others}  # process: (last beat, when it changed)
  beat = 0
  while not _exiting.is_set():
    beat += 1
    try:
      client.key_value_set(f"{_BEAT_KEY}{me}", str(beat), allow_overwrite=True)
      beats = dict(client.key_value_dir_get(_BEAT_KEY))
    except Exception:  # the coordination service is gone with process 0, which runs it
      if _exiting.is_set():
        return
      _end_lost([0])
    now = time.monotonic()
    for i in others:
      if beats.get(f"{_BEAT_KEY}{i}") != changed[i][0]:
        changed[i] = (beats.get(f"{_BEAT_KEY}{i}"), now)
    lost = [i for i in others
            if changed[i][0] != _EXITED and now - changed[i][1] > LOST_AFTER_SECONDS]
    if lost and not _exiting.is_set():
      _end_lost(lost)
    _exiting.wait(_BEAT_SECONDS)
  try:
    client.key_value_set(f"{_BEAT_KEY}{me}", _EXITED, allow_overwrite=True)
  except Exception:  # process 0 has gone first, with the coordination service
    pass


def _end_lost(lost: list[int]):
  print(f"error: process {jax.process_index()} lost process(es) {lost} of the run; nothing "
        "was saved since the last checkpoint. Relaunch every process with the same command: "
        "the run resumes from its newest checkpoint.", file=sys.stderr, flush=True)
  os._exit(1)


def wait_for_watchdog():
  """Returns once the watchdog has had time to end this process for a lost one: called before
  reporting an error that losing a process may have caused, so that a lost process gives the
  watchdog's one line, not that error."""
  if jax.process_count() > 1:
    time.sleep(LOST_AFTER_SECONDS + 4 * _BEAT_SECONDS)


def broadcast_text(text: str, source: int = 0) -> str:
  """Process `source`'s `text` on every process (the others' `text` is ignored): how one
  process's decision reaches the rest, which must not learn it by reading a shared file that
  may or may not be written yet."""
  if jax.process_count() == 1:
    return text
  is_source = jax.process_index() == source
  data = np.frombuffer(text.encode(), np.uint8) if is_source else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size), is_source=is_source))
  buffer = data if is_source else np.zeros(size, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer, is_source=is_source),
                          np.uint8)).decode()


def first_error(error: str | None) -> str | None:
  """The error of the lowest process that has one, on every process (None if none has):
  every process raises it together, so none waits at a barrier the others never reach."""
  if jax.process_count() == 1:
    return error
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
  if not failed.any():
    return None
  source = int(np.argmax(failed))
  return broadcast_text(error or "", source=source)
