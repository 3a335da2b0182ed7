"""Joins a multi-process run when the launcher asks for one (docs/method.md, "Scale").

    distributed.maybe_initialize()  # first thing in main, before anything touches a device

A run of several processes (one per TPU VM worker, or per GPU host or GPU under SLURM / Open
MPI) needs `jax.distributed.initialize()` before any device is used: it joins the processes
into one set of global devices and starts the coordination service that orbax checkpoints
rely on. On those platforms JAX finds the coordinator and the process ids itself. Anywhere
else a launcher names them in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
A plain single-process run (a laptop, a multi-GPU host) initializes nothing.
"""

from collections.abc import Mapping
import os

import jax

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


def maybe_initialize(environ: Mapping[str, str] | None = None) -> str | None:
  """Initializes jax.distributed if this is one process of several; returns the launcher."""
  environ = os.environ if environ is None else environ
  kind = launcher(environ, on_cloud_tpu_vm())
  if kind is not None:
    jax.distributed.initialize(**initialize_arguments(environ))
  return kind
