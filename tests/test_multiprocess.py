"""main.py as two processes on one CPU machine: a TPU pod rehearsed on a laptop.

Each process is started as docs/scale.md's pod rehearsal starts one (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and owns one CPU device, so every step, growth event and
checkpoint runs over devices of two processes. Checked here:

  * the run starts, grows, checkpoints and finishes whether both processes start together or
    the coordinator starts seconds late, with the same final eval each time, and with the
    parameters of the one-process run (conftest.tiny_run) to float rounding: the two devices
    sum the batch in another order (tolerances as tests/test_sharding.py's);
  * a two-process checkpoint resumes in one process (orbax reshards it);
  * processes of different configs, and a workdir they do not share, are refused before any
    work with one line and nothing written;
  * a lost process ends the others with one line naming it, within a bound;
  * the kill storm (marked `storm`, a run of its own in .ci/run): SIGKILL one process or both
    at random moments (start-up, steps, growth events, checkpoint writes), relaunch, ten times
    over, and end bit for bit as the uninterrupted two-process run.
"""

import fcntl
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hetscale_jax import checkpoint, distributed, train
from hetscale_jax import workdir as workdir_lib

from conftest import TINY_RUN_GROUP, assert_bitwise_equal, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PARAM_TOL, EVAL_RTOL = 1e-3, 1e-5
# "together" starts process 1 a moment after process 0; "process 0 late" makes process 1 wait
# for the coordinator. The kill storm's relaunches pick the first process and the delay at random.
STARTS = {"together": (0, 0.0), "process 0 late": (1, 4.0)}
# The storm: log and save every few steps, so that kills land in steps and in writes (fields
# a resumed run may change: the numbers are the uninterrupted run's).
STORM_OVERRIDES = ("--config.log_every_steps=2", "--config.checkpoint_every_steps=4")
STORM_KILLS = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(port: int, process_id: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  return {**env, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": str(process_id)}


class Pair:
  """The two processes of one launch of main.py; their output in log files."""

  def __init__(self, workdirs, cache: str, logs: pathlib.Path, overrides=(), first: int = 0,
               delay: float = 0.0, own_overrides=((), ())):
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    self.logs = [logs / f"process{i}.log" for i in range(2)]
    self.procs = [None, None]
    for i in (first, 1 - first):
      with open(self.logs[i], "a") as log:
        self.procs[i] = subprocess.Popen(
            [sys.executable, "main.py", "--config", "configs/tiny_test.py",
             f"--workdir={workdirs[i]}", f"--config.compilation_cache_dir={cache}", *overrides,
             *own_overrides[i]],
            cwd=REPO, env=_environment(port, i), stdout=log, stderr=subprocess.STDOUT)
      time.sleep(delay if i == first else 0.0)

  def wait(self, timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill([0, 1])
      raise

  def kill(self, which):
    for i in which:
      self.procs[i].send_signal(signal.SIGKILL)

  def output(self, i: int) -> str:
    return self.logs[i].read_text()


def run_pair(workdir, cache, logs, overrides=(), **start) -> list[str]:
  """Runs both processes to their end; their output. Fails unless both exit 0."""
  pair = Pair([workdir, workdir], cache, logs, overrides, **start)
  codes = pair.wait()
  outputs = [pair.output(i) for i in range(2)]
  assert codes == [0, 0], "\n".join(f"--- process {i} (exit {c}):\n{o[-3000:]}"
                                    for i, (c, o) in enumerate(zip(codes, outputs)))
  return outputs


def _max_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                          initial=0.0)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, xla_cache):
  """{start: workdir} of the tiny config run by two processes, for each way of starting.

  Under pytest-xdist the first worker to get here runs them; another waits on a lock in the
  session's shared folder and reads them (tests read the runs, or copy them).
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # this session's folder, shared by its workers
  root = root / "two_process_runs"
  root.mkdir(exist_ok=True)
  runs = {name: root / name.replace(" ", "_") for name in STARTS}
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / "done").exists():
      for name, (first, delay) in STARTS.items():
        run_pair(runs[name], xla_cache, root / f"{name.replace(' ', '_')}_logs", first=first,
                 delay=delay)
      (root / "done").touch()
  return runs


@TINY_RUN_GROUP
def test_two_processes_grow_checkpoint_and_finish_with_either_process_first(two_process_runs, tiny_run):
  ref_dir, ref = tiny_run
  reference = checkpoint.read_latest(ref_dir)
  summaries = {name: workdir_lib.read_summary(w) for name, w in two_process_runs.items()}
  first = summaries["together"]
  for name, summary in summaries.items():
    assert summary["eval"] == first["eval"], name  # the same program: the same numbers
    assert summary["architecture"] == ref["architecture"], name
    assert [e["step"] for e in summary["growth_events"]] == [22, 44]
    final = checkpoint.read_latest(two_process_runs[name])
    assert final.step == 88
    assert _max_diff(final.variables["params"], reference.variables["params"]) < PARAM_TOL, name
    assert_bitwise_equal(final.variables["growth"], reference.variables["growth"])
  for k in ("top1", "top5", "count"):
    assert first["eval"][k] == ref["eval"][k]
  np.testing.assert_allclose(first["eval"]["loss"], ref["eval"]["loss"], rtol=EVAL_RTOL)


@TINY_RUN_GROUP
def test_a_two_process_checkpoint_resumes_in_one_process(two_process_runs, tiny_run, tmp_path):
  ref_dir, ref = tiny_run
  workdir = tmp_path / "run"
  shutil.copytree(two_process_runs["together"], workdir)
  # Back to the oldest checkpoint kept (the last 3 of 20, 22, 40, 44, 60, 80, 88).
  for step in (80, 88):
    shutil.rmtree(workdir / workdir_lib.CHECKPOINTS / str(step))
  (workdir / workdir_lib.SUMMARY_FILE).unlink()
  assert train.train_and_evaluate(tiny_config(), str(workdir))["resumed_from_step"] == 60
  final = checkpoint.read_latest(str(workdir))
  assert _max_diff(final.variables["params"],
                   checkpoint.read_latest(ref_dir).variables["params"]) < PARAM_TOL


def _refused(outputs, pattern: str):
  for i, output in enumerate(outputs):
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), f"process {i}:\n{output[-3000:]}"


def test_processes_of_different_configs_are_refused_with_nothing_written(tmp_path, xla_cache):
  workdir = tmp_path / "run"
  pair = Pair([workdir, workdir], xla_cache, tmp_path / "logs",
              own_overrides=((), ("--config.growth.rule=random",)))
  assert pair.wait() == [1, 1]
  _refused([pair.output(0), pair.output(1)],
           r"process 1 was started with another config than process 0 .*growth.rule: "
           r"'row_sum' -> 'random'.* Start every process with the same --config")
  assert not workdir.exists()


def test_a_workdir_the_processes_do_not_share_is_refused_with_nothing_written(tmp_path, xla_cache):
  own_disks = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
  pair = Pair(own_disks, xla_cache, tmp_path / "logs")
  assert pair.wait() == [1, 1]
  _refused([pair.output(0), pair.output(1)], r"workdir .*run is not shared: process 1 does not see")
  assert not own_disks[0].exists() and not own_disks[1].exists()


def _wait_until(pair: Pair, condition, timeout: float = 300) -> bool:
  """Polls every 2 ms until condition(pair); False if a process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition(pair):
      return True
    if any(p.poll() is not None for p in pair.procs):
      return False
    time.sleep(0.002)
  raise TimeoutError(f"process 0 did not get there in {timeout} s")


def _wait_for_line(pair: Pair, pattern: str) -> bool:
  return _wait_until(pair, lambda pair: re.search(pattern, pair.output(0), re.MULTILINE))


def test_a_lost_process_ends_the_other_with_one_line_naming_it(tmp_path, xla_cache):
  pair = Pair([tmp_path / "run"] * 2, xla_cache, tmp_path / "logs")
  assert _wait_for_line(pair, r"^step +10/"), pair.output(0)
  pair.kill([1])
  killed = time.monotonic()
  assert pair.wait()[0] == 1
  ended_after = time.monotonic() - killed
  lines = [l for l in pair.output(0).splitlines() if l.startswith("error: ")]
  assert lines == [lines[0]] and re.fullmatch(
      r"error: process 0 lost process\(es\) \[1\] of the run; .* Relaunch every "
      r"process with the same command: the run resumes from its newest checkpoint\.", lines[0])
  assert ended_after < distributed.LOST_AFTER_SECONDS + 2


# Registered before maybe_initialize, this handler runs after the watchdog's own and before
# JAX's shutdown (atexit runs last-registered first).
_AT_JAX_SHUTDOWN = """
import atexit, threading, time
from jax._src import distributed as jax_distributed
from hetscale_jax import distributed

def at_jax_shutdown():
  alive = any(t.name == distributed.WATCHDOG_THREAD for t in threading.enumerate())
  beat = jax_distributed.global_state.client.key_value_try_get(distributed._BEAT_KEY + "0")
  print(f"watchdog alive: {alive}; last beat: {beat}")

atexit.register(at_jax_shutdown)
distributed.maybe_initialize()
time.sleep(1.2)
"""


def test_a_finished_process_ends_its_watchdog_before_jax_shuts_down():
  # A watchdog still inside a jaxlib call when the interpreter finalizes aborts the process.
  done = subprocess.run([sys.executable, "-c", _AT_JAX_SHUTDOWN], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**_environment(_free_port(), 0),
                                                     "JAX_NUM_PROCESSES": "1"})
  assert done.returncode == 0, done.stdout + done.stderr
  assert "watchdog alive: False; last beat: exited" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------- the kill storm

EVENTS = (22, 44)
MOMENTS = ("start-up", "steps", "growth event", "checkpoint write")


def _saving(workdir: pathlib.Path) -> bool:
  directory = workdir / workdir_lib.CHECKPOINTS
  return directory.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in directory.iterdir())


def _resumed_step(output: str) -> int:
  match = re.search(r"resumed at step (\d+)", output)
  return int(match.group(1)) if match else 0


def _next_event(resumed: int) -> int | None:
  """The first growth event a launch that resumed at step `resumed` has still to run."""
  return next((e for e in EVENTS if e > resumed), None)


def _trigger(moment: str, resumed: int, workdir: pathlib.Path, rng: random.Random):
  """(condition of the launch to wait for, seconds to wait after it) for a kill at
  `moment` of a launch that resumed at step `resumed`."""
  line = lambda pattern: lambda pair: re.search(pattern, pair.output(0), re.MULTILINE)
  if moment == "growth event" and _next_event(resumed):  # it starts right after its step's line
    return line(rf"^step +{_next_event(resumed)}/"), rng.uniform(0.0, 1.0)
  if moment == "checkpoint write":  # while orbax writes its temporary directory
    return lambda pair: _saving(workdir), 0.0
  if moment == "start-up":
    return line(r"^DeiT-"), rng.uniform(0.0, 1.0)
  return line(rf"^step +{resumed + 2 * rng.randint(1, 3)}/"), rng.uniform(0.0, 0.5)


@pytest.mark.storm
def test_kill_storm_ends_bit_for_bit_as_the_uninterrupted_run(tmp_path, xla_cache):
  storm_start = time.monotonic()
  reference = tmp_path / "uninterrupted"
  run_pair(reference, xla_cache, tmp_path / "uninterrupted_logs", STORM_OVERRIDES)
  workdir, rng = tmp_path / "stormed", random.Random(0)
  landed, survivor_seconds, kills_start = set(), [], time.monotonic()
  for cycle in range(STORM_KILLS):
    pair = Pair([workdir] * 2, xla_cache, tmp_path / f"launch{cycle}", STORM_OVERRIDES,
                first=rng.randrange(2), delay=rng.uniform(0.0, 3.0))
    try:
      assert _wait_for_line(pair, r"^DeiT-"), pair.output(0)
      resumed = _resumed_step(pair.output(0))
      moment = MOMENTS[cycle % len(MOMENTS)]
      condition, delay = _trigger(moment, resumed, workdir, rng)
      assert _wait_until(pair, condition), pair.output(0)
      time.sleep(delay)
      victims = rng.choice([[0], [1], [0, 1]])
      before_kill = pair.output(0)
      pair.kill(victims)
      killed = time.monotonic()
      if _saving(workdir):
        landed.add("checkpoint write")
      event = _next_event(resumed)
      if moment == "growth event" and event and f"growth at step {event}" not in before_kill:
        landed.add("growth event")
      codes = pair.wait(timeout=120)
    finally:
      pair.kill([i for i in (0, 1) if pair.procs[i].poll() is None])
    survivors = [i for i in (0, 1) if i not in victims]
    survivor_seconds.append(time.monotonic() - killed if survivors else 0.0)
    outputs = [pair.output(i) for i in (0, 1)]
    assert all("unusable" not in o for o in outputs), outputs
    for i in survivors:  # ended by the loss, not by finishing
      assert codes[i] != 0, outputs[i]
      assert f"error: process {i} lost process(es) {victims} of the run" in outputs[i] or (
          # Process 0 runs the coordination service: JAX stops the others when it goes.
          victims == [0] and "another task died" in outputs[i]), outputs[i]
  kills_seconds = time.monotonic() - kills_start
  outputs = run_pair(workdir, xla_cache, tmp_path / "final_logs", STORM_OVERRIDES)
  assert "unusable" not in outputs[0] and not (workdir / workdir_lib.CORRUPT).exists()
  assert_bitwise_equal(checkpoint.read_latest(str(workdir)).variables,
                       checkpoint.read_latest(str(reference)).variables)
  stormed, uninterrupted = (workdir_lib.read_summary(str(w)) for w in (workdir, reference))
  assert stormed["eval"] == uninterrupted["eval"]
  assert stormed["architecture"] == uninterrupted["architecture"]
  assert max(survivor_seconds) < distributed.LOST_AFTER_SECONDS + 2
  assert landed == {"growth event", "checkpoint write"}, landed
  print(f"\nkill storm: {STORM_KILLS} kills (landed in {sorted(landed)}) in {kills_seconds:.0f} s, "
        f"{time.monotonic() - storm_start:.0f} s with the uninterrupted run and the final launch; "
        f"survivors of a kill ended {max(survivor_seconds):.1f} s after it at most")
