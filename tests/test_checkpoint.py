"""Checkpoints and fault tolerance on the tiny config (2 growth events in 88 steps, grown by
the released mechanism: linear units and by_kind quotas).

One uninterrupted run is the reference. A run stopped after the first growth event and
resumed, a run killed (SIGKILL, some kills during a save) and stopped (SIGTERM) over and
over, and a run resumed past a damaged checkpoint must all end with the reference's params,
bit for bit. Bad inputs are refused and leave the workdir as it was.

Compiling dominates the time here, so every run shares a persistent compilation cache
(conftest.xla_cache), and the reference is the session's tiny_run, which test_train reads too.
"""

import functools
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import pytest

from hetscale_jax import checkpoint, config_lib, datasets, export, input_pipeline, sharding, spec, train
from hetscale_jax import workdir as workdir_lib

from conftest import (POISON_PIXEL, TINY_RUN_GROUP, assert_bitwise_equal, poison_saturated_images,
                      snapshot, tiny_config)

REPO = pathlib.Path(__file__).resolve().parents[1]
STOP_STEP = 30  # after the first growth event (step 22), before the second (44)


pytestmark = TINY_RUN_GROUP


@pytest.fixture
def reference(tiny_run):
  """(workdir, summary) of the uninterrupted run."""
  return tiny_run


@pytest.fixture(scope="module")
def stopped(xla_cache, tmp_path_factory):
  """Workdir of the run stopped at STOP_STEP: checkpoints 20 (periodic), 22 (right after the
  growth event) and 30 (the stop). Tests work on copies."""
  workdir = str(tmp_path_factory.mktemp("stopped"))
  assert train.train_and_evaluate(tiny_config(), workdir, stop_after_steps=STOP_STEP) is None
  return workdir


def copy_of(workdir, tmp_path) -> str:
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target)
  return target


def checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def final_variables(workdir):
  return checkpoint.read_latest(workdir).variables


def events_without_timings(summary):
  return [{k: v for k, v in e.items() if not k.startswith("seconds")}
          for e in summary["growth_events"]]


def restore_target(config):
  """train.abstract_state for `config`, as train_and_evaluate passes it to restore."""
  info = input_pipeline.dataset_info(config.data)
  tx = train.create_optimizer(config, datasets.steps_per_epoch(info, config.batch_size))
  return functools.partial(train.abstract_state, config, train.create_model(config, info), tx,
                           info, sharding.make_mesh(1))


# ---------------------------------------------------------------------------- resume

def test_resumed_run_ends_bit_for_bit_as_the_uninterrupted_one(reference, stopped, tmp_path, capsys,
                                                               monkeypatch):
  ref_dir, ref = reference
  assert checkpoint_steps(ref_dir) == [60, 80, 88]  # every 20, after events, the end; last 3
  assert checkpoint_steps(stopped) == [20, 22, STOP_STEP]
  copy_of(stopped, tmp_path)
  # Relative, like main.py's default workdir: orbax itself accepts only absolute paths.
  monkeypatch.chdir(tmp_path)
  workdir = "run"

  jax.clear_caches()  # compile counts as a fresh process's, whatever ran before in this one
  resumed = train.train_and_evaluate(tiny_config(), workdir)
  assert f"resumed at step {STOP_STEP} with 1 events done" in capsys.readouterr().out
  assert_bitwise_equal(final_variables(workdir), final_variables(ref_dir))
  assert resumed["eval"] == ref["eval"] and resumed["architecture"] == ref["architecture"]
  # Event 22 comes from the checkpoint, event 44 is computed anew.
  assert events_without_timings(resumed) == events_without_timings(ref)
  # This run's compiles: the train step for the restored grown tree alone (event 44's units
  # fit the slots event 22 reserved); for event 44 the spectrum's statistics and its solve.
  assert resumed["compiles"]["train_step"]["compiles"] == 1
  assert resumed["compiles"]["spectrum"]["compiles"] == 2
  assert resumed["resumed_from_step"] == STOP_STEP and ref["resumed_from_step"] is None

  # Once more: the run is finished, nothing is redone.
  before = snapshot(workdir)
  assert train.train_and_evaluate(tiny_config(), workdir)["eval"] == ref["eval"]
  assert "nothing to do" in capsys.readouterr().out
  assert snapshot(workdir) == before


def test_checkpoint_after_growth_restores_the_grown_model(stopped):
  config = tiny_config()
  with checkpoint.Checkpointer(stopped, config) as ckpt:
    restored = ckpt.restore(restore_target(config))
  assert int(restored.state.step) == STOP_STEP
  assert [e["step"] for e in restored.growth_events] == [22]
  # Every layer holds linear packs (the first event reserves slots for the later one); the
  # units they hold are event 22's picks.
  architecture = checkpoint.read_latest(stopped).architecture
  assert all(list(layer["units"]) == ["linear"] for layer in architecture["layers"].values()
             if layer["units"])
  units = {path: spec.layer_units(layer) for path, layer in architecture["layers"].items()
           if spec.layer_units(layer)}
  assert units and units == {p: n for p, n in restored.growth_events[0]["grown"].items() if n}
  assert spec.count_params(restored.state.variables) == restored.growth_events[0]["params_after"]


# ---------------------------------------------------------------------------- kills

def _launch(workdir, xla_cache, log, *overrides):
  return subprocess.Popen(
      [sys.executable, "main.py", "--config", "configs/tiny_test.py", f"--workdir={workdir}",
       f"--config.compilation_cache_dir={xla_cache}", *overrides],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(condition, proc, timeout=120.0) -> bool:
  """Polls every millisecond until condition(); False if the process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.001)
  raise TimeoutError("the training subprocess neither progressed nor exited")


def _saving(workdir) -> bool:
  directory = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  return os.path.isdir(directory) and any("orbax-checkpoint-tmp" in n for n in os.listdir(directory))


def _progressed(workdir, log_path, latest: int) -> bool:
  """Training and a checkpoint after `latest` complete: each launch gets somewhere."""
  with open(log_path) as f:
    return "train step compiled" in f.read() and max(checkpoint_steps(workdir), default=-1) > latest


def test_killed_and_preempted_run_resumes_and_ends_as_the_uninterrupted_one(
    reference, xla_cache, tmp_path):
  workdir, rng = str(tmp_path / "run"), random.Random(0)
  # SIGKILL at random moments of training and in the middle of a save (saving every 2 steps,
  # a resumable config change), then SIGTERM, which saves and exits 0, then a run to the end.
  plan = ["kill at random", "kill in save", "kill at random", "sigterm", "finish"]
  killed_in_save, resumed_at = False, []
  for i, action in enumerate(plan):
    log_path, latest = tmp_path / f"log{i}.txt", max(checkpoint_steps(workdir), default=-1)
    progressed = functools.partial(_progressed, workdir, log_path, latest)
    with open(log_path, "w") as log:
      proc = _launch(workdir, xla_cache, log,
                     *([] if action == "finish" else ["--config.checkpoint_every_steps=2"]))
    try:
      if action == "kill in save":
        if _wait_for(lambda: progressed() and _saving(workdir), proc):
          proc.kill()
          killed_in_save = proc.wait() == -signal.SIGKILL and _saving(workdir)
      elif action != "finish" and _wait_for(progressed, proc):
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGTERM if action == "sigterm" else signal.SIGKILL)
      rc = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
    output = log_path.read_text()
    assert "unusable" not in output and "Traceback" not in output, output
    if "resumed at step" in output:
      resumed_at.append(int(output.split("resumed at step ")[1].split()[0]))
    if action == "sigterm":
      assert rc == 0 and "stopped at step" in output, output
      step = int(output.split("stopped at step ")[1].split("/")[0])
      assert step == checkpoint_steps(workdir)[-1]
    elif action == "finish":
      assert rc == 0, output
    else:
      assert rc == -signal.SIGKILL, output
  assert killed_in_save, "the kill did not land in a save"
  assert len(resumed_at) == len(plan) - 1 and resumed_at == sorted(set(resumed_at)), resumed_at
  assert not os.path.exists(os.path.join(workdir, workdir_lib.CORRUPT))
  assert_bitwise_equal(final_variables(workdir), final_variables(reference[0]))


# ---------------------------------------------------------------------------- damage

def _damage_files(directory, damage):
  for path in pathlib.Path(directory).rglob("*"):
    if path.is_file() and path.name != "commit_success.txt":
      data = bytearray(path.read_bytes())
      path.write_bytes(damage(data))


def _truncate(data):
  return data[:len(data) // 2]


def _flip_bytes(data):
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  return data


def _damage(workdir, how):
  newest = os.path.join(workdir, workdir_lib.CHECKPOINTS, str(STOP_STEP))
  if how == "truncated files":
    _damage_files(os.path.join(newest, "state"), _truncate)
  elif how == "flipped bytes":
    _damage_files(os.path.join(newest, "state"), _flip_bytes)
  elif how == "state of another step":
    # Same shapes (both after the first event), other values: only the checksums can tell.
    shutil.rmtree(os.path.join(newest, "state"))
    shutil.copytree(os.path.join(workdir, workdir_lib.CHECKPOINTS, "22", "state"),
                    os.path.join(newest, "state"))
  elif how == "truncated metadata":
    _damage_files(os.path.join(newest, "run"), _truncate)


@pytest.mark.parametrize("how", ["truncated files", "flipped bytes", "state of another step",
                                 "truncated metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(stopped, tmp_path, caplog, how):
  workdir = copy_of(stopped, tmp_path)
  _damage(workdir, how)
  config = tiny_config()
  with checkpoint.Checkpointer(workdir, config) as ckpt:
    restored = ckpt.restore(restore_target(config))
  assert int(restored.state.step) == 22
  assert f"checkpoint at step {STOP_STEP} is unusable" in caplog.text
  assert checkpoint_steps(workdir) == [20, 22]
  [moved] = os.listdir(os.path.join(workdir, workdir_lib.CORRUPT))
  assert moved.startswith(f"{STOP_STEP}-")


def test_run_resumed_past_a_damaged_checkpoint_ends_as_the_uninterrupted_one(
    reference, stopped, tmp_path, caplog):
  workdir = copy_of(stopped, tmp_path)
  _damage(workdir, "flipped bytes")
  train.train_and_evaluate(tiny_config(), workdir)
  assert "resumed from step 22" in caplog.text
  assert_bitwise_equal(final_variables(workdir), final_variables(reference[0]))


def test_no_restorable_checkpoint_is_an_error_that_moves_nothing(stopped, tmp_path):
  workdir = copy_of(stopped, tmp_path)
  for step in checkpoint_steps(workdir):
    _damage_files(os.path.join(workdir, workdir_lib.CHECKPOINTS, str(step), "run"), _truncate)
  before = snapshot(workdir)
  config = tiny_config()
  with pytest.raises(checkpoint.CheckpointError, match="none of the checkpoints"):
    with checkpoint.Checkpointer(workdir, config) as ckpt:
      ckpt.restore(restore_target(config))
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------- refusals

def _unknown_field(c):
  c.growth.budget = 100


def _negative_budget(c):
  c.growth.budget_per_event = -200


def _growth_past_the_end(c):
  c.growth.epochs = (0.5, 2.5)


def _missing_dataset(c, empty_dir):
  c.data = datasets.default_data_config("cifar100")
  c.data.data_dir = empty_dir


def _other_config(c):
  c.model.mlp_dim = 24


@pytest.mark.parametrize("mutate, error, message", [
    (_unknown_field, config_lib.ConfigError, "unknown config field config.growth.budget"),
    (_negative_budget, config_lib.ConfigError, "growth.budget_per_event=-200 is invalid"),
    (_growth_past_the_end, config_lib.ConfigError, "growth epoch must be in"),
    (_missing_dataset, input_pipeline.DatasetNotFoundError, "cifar100 is not prepared"),
    (_other_config, workdir_lib.WorkdirError, r"another config .*model.mlp_dim: 16 -> 24"),
])
def test_bad_input_is_refused_and_changes_nothing(stopped, tmp_path, mutate, error, message):
  workdir = copy_of(stopped, tmp_path)
  new_workdir = str(tmp_path / "new")
  before = snapshot(workdir)
  config = tiny_config()
  if mutate is _missing_dataset:
    os.makedirs(tmp_path / "empty")
    mutate(config, str(tmp_path / "empty"))
  else:
    mutate(config)
  # Another config is refused only where another run is; bad inputs anywhere, writing nothing.
  for target in [workdir] if error is workdir_lib.WorkdirError else [workdir, new_workdir]:
    with pytest.raises(error, match=message):
      train.train_and_evaluate(config, target)
  assert snapshot(workdir) == before
  assert not os.path.exists(new_workdir)


def test_checkpoint_of_another_architecture_is_refused(stopped, tmp_path):
  workdir = copy_of(stopped, tmp_path)
  before = snapshot(workdir)
  config, other = tiny_config(), tiny_config()
  other.model.mlp_dim = 24
  with pytest.raises(workdir_lib.WorkdirError, match="another architecture"):
    with checkpoint.Checkpointer(workdir, config) as ckpt:
      ckpt.restore(restore_target(other))
  assert snapshot(workdir) == before


def test_workdir_with_other_files_or_a_file_is_refused_and_fresh_picks_a_new_one(stopped, tmp_path):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("not a run")
  with pytest.raises(workdir_lib.WorkdirError, match="holds no hetscale_jax run"):
    train.train_and_evaluate(tiny_config(), str(foreign))
  assert os.listdir(foreign) == ["notes.txt"]
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  for call in (lambda w: train.train_and_evaluate(tiny_config(), w), workdir_lib.fresh):
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"workdir {a_file} is a file, not a directory; nothing was written"):
      call(str(a_file))
  assert a_file.read_text() == "not a directory"

  assert workdir_lib.fresh(str(tmp_path / "new")) == str(tmp_path / "new")
  assert workdir_lib.fresh(str(foreign)) == str(foreign / "fresh_1")
  (foreign / "fresh_1").mkdir()
  assert workdir_lib.fresh(str(foreign)) == str(foreign / "fresh_2")


def test_non_finite_step_stops_with_its_step_and_keeps_the_checkpoints(
    stopped, tmp_path, monkeypatch):
  workdir = copy_of(stopped, tmp_path)
  before = snapshot(os.path.join(workdir, workdir_lib.CHECKPOINTS))
  real_batches = input_pipeline.train_batches

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real_batches(*args, start_step=start_step, **kwargs), start_step):
      yield dict(batch, image=np.full_like(batch["image"], POISON_PIXEL)) if step == 33 else batch
  monkeypatch.setattr(input_pipeline, "train_batches", poisoned)
  poison_saturated_images(monkeypatch)
  with pytest.raises(train.NonFiniteError, match="not finite at step 33"):
    train.train_and_evaluate(tiny_config(), workdir)
  assert snapshot(os.path.join(workdir, workdir_lib.CHECKPOINTS)) == before


# ---------------------------------------------------------------------------- export

def test_export_writes_variables_spec_and_summary_that_research_code_can_load(
    reference, tmp_path, capsys):
  ref_dir, ref = reference
  out = str(tmp_path / "export")
  export.main(["--workdir", ref_dir, "--out", out])
  assert f"exported to {out}" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["architecture.txt", "config.json", "spec.json",
                                     "variables.msgpack"]

  with open(os.path.join(out, "variables.msgpack"), "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
  assert_bitwise_equal(variables, final_variables(ref_dir))
  with open(os.path.join(out, "spec.json")) as f:
    assert json.load(f) == ref["architecture"]
  with open(os.path.join(out, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  info = input_pipeline.dataset_info(config.data)
  batch = next(input_pipeline.eval_batches(config.data, global_batch_size=64))
  logits = train.create_model(config, info).apply(
      variables, train.model_input(config)(batch["image"]), train=False)
  accuracy = np.mean(np.argmax(logits, -1) == batch["label"])
  assert logits.shape == (64, info.num_classes) and accuracy > 0.2  # chance is 0.1
  with open(os.path.join(out, "architecture.txt")) as f:
    text = f.read()
  assert f"parameters: {ref['params']:,} = {ref['base_params']:,} before growth" in text
  assert "linear units on" in text

  with pytest.raises(SystemExit, match="exists; nothing was overwritten"):
    export.main(["--workdir", ref_dir, "--out", out])


def test_configs_that_do_not_grow_differ_in_no_growth_field():
  """A run without growth computes nothing from its growth fields: another such config may
  resume it (and a study sharing its static runs read it); once either grows, they count."""
  static, later = tiny_config(), tiny_config()
  static.growth.enabled = later.growth.enabled = False
  later.growth.epochs = (1.0, 1.5)
  later.growth.unit_only_steps = 7
  differences = lambda a, b: workdir_lib.config_differences(
      workdir_lib.config_dict(a), workdir_lib.config_dict(b))
  assert differences(static, later) == []
  later.model.mlp_dim = 24
  assert differences(static, later) == ["model.mlp_dim: 16 -> 24"]
  assert differences(static, tiny_config()) == ["growth.enabled: False -> True"]


def test_a_workdir_whose_config_cannot_be_read_is_refused_unchanged(tmp_path):
  marker = tmp_path / workdir_lib.CONFIG_FILE
  marker.write_text('{"seed": 0, "model": ')  # cut off mid-write
  with pytest.raises(workdir_lib.WorkdirError, match="is not a readable config.*nothing was changed"):
    workdir_lib.claim(str(tmp_path), tiny_config())
  assert os.listdir(tmp_path) == [workdir_lib.CONFIG_FILE]
  assert marker.read_text() == '{"seed": 0, "model": '
