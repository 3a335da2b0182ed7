"""Sharded training gives the numbers of one device (docs/method.md, "Scale").

XLA fixes the number of CPU devices when its backend starts, which the rest of the suite has
long done in the pytest process, so the sharded runs happen in fresh subprocesses running
this file, all started at once: one process with 8 devices, and two processes of 4 devices
joined by jax.distributed (the multi-host path: each process reads its own half of every
batch, results are gathered across processes). Each runs the same scenario per mesh:

  a train step; a growth event (the splitting spectrum on a probe of two batches, the plan,
  the grown parameters and migrated optimizer state); the train step rebuilt for the grown
  state, and one step of it; an eval step.

Float32 everywhere. The meshes differ only in the order of reductions (over the batch split
across devices, over FSDP shards), so they agree to rounding, not bit for bit. Worst cases
measured against one device over all meshes, and the tolerances:
  loss                        7.2e-7      1e-5
  params, optimizer state     1.4e-6      2e-5   (one step moves a param by up to lr = 3.1e-3)
  eigenvalues / max |eig|     4.0e-7      1e-5   (per layer)
  eval loss sum, relative     1.2e-7      1e-6   (top-1, top-5 and count exactly)
  plan (grown neurons)        identical
"""

import fcntl
import itertools
import os
import pathlib
import pickle
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hetscale_jax import distributed, growth_event, input_pipeline, sharding, train

from conftest import FAST_COMPILE, tiny_config

MESHES = {"1": (1, 1), "data8": (8, 1), "fsdp4": (2, 4), "fsdp8": (1, 8)}  # (data, fsdp)
# FSDP over all 8 devices runs once, in the two processes, where it also splits params and
# batch across processes: in one process as well it would say nothing more.
ONE_PROCESS = ("1", "data8", "fsdp4")
TWO_PROCESSES = ("fsdp8",)
LOSS_TOL, PARAM_TOL, EIG_TOL, EVAL_RTOL = 1e-5, 2e-5, 1e-5, 1e-6


def one_block_config():
  config = tiny_config()
  config.model.depth = 1  # compiling dominates; one block has every kind of growable layer
  # The peak learning rate from step 0: one step then moves the params far above rounding.
  config.optim.warmup_epochs = 0.0
  return config


# ---------------------------------------------------------------------------- subprocess side

def _flat(tree) -> dict:
  """{path: numpy array}, the whole value on every process."""
  return {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(sharding.host_value(tree))[0]}


def _layout(tree) -> dict:
  """{path: (partition spec, shape of a shard on this process, global shape)}."""
  return {jax.tree_util.keystr(k): (str(v.sharding.spec), v.addressable_shards[0].data.shape, v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_scenario(data: int, fsdp: int) -> dict:
  config = one_block_config()
  mesh = sharding.make_mesh(fsdp, jax.devices()[:data * fsdp])
  info = input_pipeline.dataset_info(config.data)
  model = train.create_model(config, info)
  tx = train.create_optimizer(config, steps_per_epoch=10)
  train_step = train.make_train_step(model, tx, config, info.num_classes)
  # A mesh of some devices of one process (the 1-device reference) reads whole batches.
  processes = {} if mesh.devices.size == jax.device_count() else {"process_index": 0,
                                                                   "process_count": 1}
  local = list(itertools.islice(input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=0, **processes), 3))
  batches = [sharding.global_batch(mesh, b) for b in local]
  eval_batch = sharding.global_batch(mesh, next(input_pipeline.eval_batches(
      config.data, global_batch_size=config.batch_size, **processes)))

  state = train.init_state(config, model, tx, info)
  state = jax.device_put(state, train.state_shardings(mesh, state))
  compiled = train.compile_train_step(train_step, mesh, state, batches[0])
  state, metrics = compiled.fn(state, batches[0])
  out = {"local_batch": len(local[0]["label"]), "loss0": float(metrics["loss"]),
         "params0": _flat(state.params)}

  config.growth.budget_per_event = 400
  config.growth.probe_batches = 2  # several batches: their statistics in one body (lax.map)
  grown, event = growth_event.grow_state(config, model, tx, state, batches[1:], weights_left=[1.0],
                                         num_classes=info.num_classes,
                                         model_input=train.model_input(config),
                                         peak_lr=train.peak_learning_rate(config))
  spectrum, plan = event.spectrum, event.plan
  out["eigvals"] = {p: np.asarray(s.eigvals) for p, s in spectrum.items()}
  out["plan"] = {p: i.tolist() for p, i in plan.indices.items()}
  out["grown_params"] = _flat(grown.params)
  # As the training loop does after a growth event: rebuild the step, place the grown state.
  compiled = train.compile_train_step(train_step, mesh, grown, batches[1])
  grown = jax.device_put(grown, compiled.shardings)
  out["layout"] = {"params": _layout(grown.params), "opt_state": _layout(grown.opt_state)}
  grown, metrics = compiled.fn(grown, batches[1])
  out["loss1"] = float(metrics["loss"])
  out["params1"] = _flat(grown.params)
  out["opt_state1"] = _flat(grown.opt_state)
  out["eval"] = _flat(train.make_eval_step(model, config)(grown.variables, eval_batch))
  return out


def subprocess_main(output: str, meshes: list[str]):
  distributed.maybe_initialize()  # before anything touches a device (importing jax does not)
  results = {name: run_scenario(*MESHES[name]) for name in meshes}
  if jax.process_index() == 0:
    with open(output, "wb") as f:
      pickle.dump(results, f)


# ---------------------------------------------------------------------------- pytest side

def _environment(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_")) and k != "XLA_FLAGS"}
  flags = [f"--xla_force_host_platform_device_count={devices}", FAST_COMPILE]
  # jaxlib's CPU eigh waits for helper tasks on the thread pool that runs it: one eigh per
  # device at once deadlocks a pool no larger than the number of devices (NPROC sizes it).
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "NPROC": str(4 * devices),
          "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(output, meshes, env):
  return subprocess.Popen([sys.executable, __file__, str(output), *meshes], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_all(folder: pathlib.Path) -> dict:
  """Runs the one-process and the two-process scenarios side by side; their results."""
  port = _free_port()
  runs = {"one process": _start(folder / "one.pkl", ONE_PROCESS, _environment(8))}
  for i in range(2):
    runs[f"process {i} of 2"] = _start(folder / "two.pkl", TWO_PROCESSES, _environment(
        4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i)))
  failed = []
  for name, run in runs.items():
    try:
      log, _ = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      run.kill()
      log, _ = run.communicate()
    if run.returncode != 0:
      failed.append(f"--- {name} (exit {run.returncode}):\n{log[-4000:]}")
  if failed:
    pytest.fail("\n".join(failed))
  with open(folder / "one.pkl", "rb") as f:
    out = pickle.load(f)
  with open(folder / "two.pkl", "rb") as f:
    out.update({f"2 processes: {k}": v for k, v in pickle.load(f).items()})
  return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """{mesh name: scenario results}; "2 processes: fsdp8" from the two-process run.

  Under pytest-xdist each worker that gets a test of this module would start the runs again:
  the first one runs them, the others wait on a lock in the session's shared folder and read.
  """
  folder = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    folder = folder.parent  # this session's folder, shared by its workers
  folder = folder / "sharding_runs"
  folder.mkdir(exist_ok=True)
  with open(folder / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / "results.pkl").exists():
      out = _run_all(folder)
      with open(folder / "results.pkl", "wb") as f:
        pickle.dump(out, f)
  with open(folder / "results.pkl", "rb") as f:
    return pickle.load(f)


SHARDED = [*ONE_PROCESS[1:], *[f"2 processes: {m}" for m in TWO_PROCESSES]]


def _max_diff(actual: dict, expected: dict) -> float:
  assert actual.keys() == expected.keys()
  for k in expected:
    assert np.shape(actual[k]) == np.shape(expected[k]), k
  return max(float(np.max(np.abs(actual[k] - expected[k]), initial=0.0)) for k in expected)


@pytest.mark.parametrize("mesh", SHARDED)
def test_train_step_matches_one_device(results, mesh):
  got, ref = results[mesh], results["1"]
  assert abs(got["loss0"] - ref["loss0"]) < LOSS_TOL
  assert _max_diff(got["params0"], ref["params0"]) < PARAM_TOL


@pytest.mark.parametrize("mesh", SHARDED)
def test_spectrum_and_plan_match_one_device(results, mesh):
  got, ref = results[mesh], results["1"]
  assert got["eigvals"].keys() == ref["eigvals"].keys()
  for path, lam in ref["eigvals"].items():
    assert np.max(np.abs(got["eigvals"][path] - lam)) < EIG_TOL * np.max(np.abs(lam)), path
  assert got["plan"] == ref["plan"]
  assert sum(map(len, ref["plan"].values())) > 0, "the scenario must grow something"


@pytest.mark.parametrize("mesh", SHARDED)
def test_growth_and_rebuilt_step_match_one_device(results, mesh):
  got, ref = results[mesh], results["1"]
  assert any("['gated_r']" in k or "['linear_w']" in k for k in ref["grown_params"])
  assert _max_diff(got["grown_params"], ref["grown_params"]) < PARAM_TOL
  assert abs(got["loss1"] - ref["loss1"]) < LOSS_TOL
  assert _max_diff(got["params1"], ref["params1"]) < PARAM_TOL
  assert _max_diff(got["opt_state1"], ref["opt_state1"]) < PARAM_TOL
  for k in ("['top1']", "['top5']", "['count']"):
    assert got["eval"][k] == ref["eval"][k]
  np.testing.assert_allclose(got["eval"]["['loss']"], ref["eval"]["['loss']"], rtol=EVAL_RTOL)


def test_each_process_reads_its_own_part_of_the_batch(results):
  batch = one_block_config().batch_size
  assert results["1"]["local_batch"] == results["fsdp4"]["local_batch"] == batch
  assert results["2 processes: fsdp8"]["local_batch"] == batch // 2


def _sharded_axis(spec: str, shard: tuple, shape: tuple, fsdp: int):
  """The axis split over "fsdp" (checking the shard's shape), or None if replicated."""
  axes = [i for i, entry in enumerate(re.findall(r"None|'\w+'", spec)) if entry == "'fsdp'"]
  if not axes:
    assert spec == "P()" and shard == shape, (spec, shard, shape)
    return None
  (axis,) = axes
  assert shard == shape[:axis] + (shape[axis] // fsdp,) + shape[axis + 1:], (spec, shard, shape)
  return axis


@pytest.mark.parametrize("mesh", ["data8", "fsdp4", "2 processes: fsdp8"])
def test_fsdp_shards_params_and_optimizer_state(results, mesh):
  fsdp = MESHES[mesh.rsplit(" ", 1)[-1]][1]
  layout = results[mesh]["layout"]
  held = total = 0
  for kind in ("params", "opt_state"):
    for path, (spec, shard, shape) in layout[kind].items():
      axis = _sharded_axis(spec, shard, shape, fsdp)
      divisible = [size for size in shape if size % fsdp == 0]
      if fsdp == 1 or not divisible:
        assert axis is None, path
      else:  # split along the largest divisible axis: grown units too, mu and nu alike
        assert axis is not None and shape[axis] == max(divisible), path
      held += int(np.prod(shard))
      total += int(np.prod(shape))
  if fsdp > 1:
    # Only the few small leaves with no axis fsdp divides stay whole (this tiny model's head
    # bias, units of an odd count, step counts); with FSDP off everything is replicated.
    assert held - total / fsdp < 0.1 * total, (held, total)
  else:
    assert held == total
  assert any("['gated_r']" in path or "['linear_w']" in path for path in layout["params"])


# ---------------------------------------------------------------------------- launcher detection

@pytest.mark.parametrize("environ, on_tpu, expected", [
    ({}, False, None),
    ({}, True, "cloud_tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, "explicit"),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-2]"}, False, "slurm"),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, False, None),  # one task owns the GPUs
    ({"SLURM_NTASKS": "8"}, False, None),  # an allocation, outside srun
    ({"OMPI_COMM_WORLD_SIZE": "4"}, False, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False, None),
])
def test_launcher_detection(environ, on_tpu, expected):
  assert distributed.launcher(environ, on_tpu) == expected


def test_cloud_tpu_detection_falls_back_to_false_where_jax_moved_its_flag(monkeypatch):
  assert distributed.on_cloud_tpu_vm() is False  # this CPU machine
  monkeypatch.setattr(distributed._cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  assert distributed.on_cloud_tpu_vm() is True
  monkeypatch.setattr(distributed, "_cloud_tpu_init", None)
  assert distributed.on_cloud_tpu_vm() is False


def test_initialize_arguments_pass_what_the_launcher_named():
  assert distributed.initialize_arguments({}) == {}
  assert distributed.initialize_arguments(
      {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}) == {"num_processes": 4, "process_id": 2}


if __name__ == "__main__":
  subprocess_main(sys.argv[1], sys.argv[2:])
