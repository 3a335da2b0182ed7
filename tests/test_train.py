"""The training loop: recipe pieces, a few steps on a fixed batch, and a run with growth."""

import importlib.util
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from hetscale_jax import (compute, config_lib, growth_event, input_pipeline, replicate, sharding,
                          spec, splitting, train, writers)
from hetscale_jax import workdir as workdir_lib

from conftest import POISON_PIXEL, TINY_RUN_GROUP, poison_saturated_images, tiny_config

def test_learning_rate_schedule_follows_the_deit_recipe():
  config = tiny_config()
  config.batch_size, config.num_epochs = 256, 10
  config.optim.base_lr, config.optim.warmup_epochs = 5e-4, 2.0
  schedule = train.learning_rate_schedule(config, steps_per_epoch=100)
  np.testing.assert_allclose(float(schedule(0)), config.optim.warmup_lr, rtol=1e-4)
  np.testing.assert_allclose(float(schedule(200)), 5e-4 * 256 / 512, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1000)), config.optim.min_lr, rtol=1e-6)


def compiled_tiny_step(config=None):
  """(compiled train step, initial state, one training batch) of the tiny config (or
  `config`)."""
  config = config or tiny_config()
  info = input_pipeline.dataset_info(config.data)
  model = train.create_model(config, info)
  tx = train.create_optimizer(config, steps_per_epoch=10)
  mesh = sharding.make_mesh(1)
  state = train.init_state(config, model, tx, info)
  batch = sharding.global_batch(mesh, next(input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=0)))
  step = train.compile_train_step(train.make_train_step(model, tx, config, info.num_classes),
                                  mesh, state, batch)
  return step, state, batch


def test_a_few_train_steps_lower_the_loss_on_a_fixed_batch():
  step, state, batch = compiled_tiny_step()
  losses = []
  for _ in range(25):
    state, metrics = step.fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 25
  # From ~ln(10) = 2.30 at a warm-up learning rate: a clear, steady fall within 25 steps.
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.15, losses


def test_a_warmed_up_spectrum_compiles_nothing_at_the_events():
  """With the slots of the whole schedule held from the start (tiny_test), the spectrum that
  warm_up_spectrum computes in its thread has the programs of the next event, whose units are
  those of the state it copied: the event's spectrum, of the parameters trained meanwhile from
  that state, compiles nothing."""
  config = tiny_config()
  assert config.growth.slots == "schedule"
  step, state, batch = compiled_tiny_step()
  state = jax.device_put(state, step.shardings)  # as training places it
  info = input_pipeline.dataset_info(config.data)
  model, model_input = train.create_model(config, info), train.model_input(config)
  warm_up = growth_event.warm_up_spectrum(config, model, state, batch,
                                          num_classes=info.num_classes, model_input=model_input)
  for _ in range(3):  # donates the state the thread copied
    state, _ = step.fn(state, batch)
  warm_up.join()
  programs = (splitting._collected_statistics, splitting._collected_solve)  # pylint: disable=protected-access
  compiled = [p._cache_size() for p in programs]  # pylint: disable=protected-access
  loss_fn = growth_event.probe_loss(model, info.num_classes, config.label_smoothing, model_input)
  variables = {"params": state.params, "growth": sharding.host_value(state.growth)}
  event = growth_event.event_spectrum(config, loss_fn, variables, [batch], int(state.step))
  assert [p._cache_size() for p in programs] == compiled  # pylint: disable=protected-access
  assert all(np.all(np.isfinite(s.eigvals)) for s in sharding.host_value(event).values())


def test_non_finite_step_is_skipped_and_reported_with_its_step(monkeypatch):
  poison_saturated_images(monkeypatch)
  step, state, batch = compiled_tiny_step()
  state, _ = step.fn(state, batch)
  params_before = jax.device_get(state.params)
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(POISON_PIXEL))
  state, _ = step.fn(state, bad)
  unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), params_before, jax.device_get(state.params))
  assert all(jax.tree.leaves(unchanged)), "a non-finite step must not change the params"
  with pytest.raises(train.NonFiniteError, match="not finite at step 1"):
    train.check_finite(state)


@TINY_RUN_GROUP
def test_training_run_grows_by_the_plan_and_keeps_learning(tiny_run):
  workdir, summary = tiny_run
  events = summary["growth_events"]
  assert [e["step"] for e in events] == [22, 44]
  for event in events:
    assert event["params_after"] - event["params_before"] == event["plan_params"] > 0
  assert summary["params"] == events[-1]["params_after"]
  # What this run compiled: the train step, the eval step (steps 44 and 88 and the ablation)
  # and the contribution step once, since its layers hold the unit slots of both events from
  # the start (growth.slots "schedule") and no event changes their shapes; so do the spectrum's
  # two programs, its statistics on the whole depth lists (layers.whole_lists) and its solve.
  # Served by the session's persistent cache or not, each is a compile.
  compiles = summary["compiles"]
  assert {name: c["compiles"] for name, c in compiles.items()} == {
      "train_step": 1, "eval_step": 1, "spectrum": 2, "contribution_step": 1}
  assert all(0 <= c["cache_hits"] <= c["compiles"] and c["seconds"] > 0 for c in compiles.values())
  records = writers.read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  after_growth = [r["loss"] for r in records if r["kind"] == "train" and r["step"] > events[0]["step"]]
  assert min(after_growth) < losses[0]
  assert summary["eval"]["top1"] > 0.2  # 10 classes: chance is 0.1
  assert os.listdir(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR))
  assert workdir_lib.read_summary(workdir)["params"] == summary["params"]
  grown_units = spec.num_units(summary["architecture"])
  assert grown_units == sum(sum(e["grown"].values()) for e in events)
  # The unit ablation: the intact model is the final evaluation, every grown layer's units
  # contribute, and switching them all off changes the test loss.
  units = summary["unit_ablation"]
  assert units["intact"] == {"loss": summary["eval"]["loss"], "top1": summary["eval"]["top1"]}
  assert units["units_off"]["loss"] != units["intact"]["loss"]
  assert set(units["contribution"]) == {p for p, layer in summary["architecture"]["layers"].items()
                                        if spec.layer_units(layer)}
  assert all(v > 0 for v in units["contribution"].values())


def test_a_summary_names_the_commit_of_the_code_it_ran(tiny_run, tmp_path):
  """summary["commit"]: the checkout's HEAD, "+modified" where a tracked file differs from it,
  None for a package outside a checkout of its own; checked on a copy of the module."""
  assert tiny_run[1]["commit"] == workdir_lib.code_commit()
  package = tmp_path / "checkout" / "hetscale_jax"
  package.mkdir(parents=True)
  module_file = package / "workdir.py"
  shutil.copy(workdir_lib.__file__, module_file)
  loader_spec = importlib.util.spec_from_file_location("copied_workdir", module_file)
  copied = importlib.util.module_from_spec(loader_spec)
  loader_spec.loader.exec_module(copied)
  assert copied.code_commit() is None
  git = lambda *args: subprocess.run(
      ["git", "-C", str(package.parent), "-c", "user.name=t", "-c", "user.email=t@t", *args],
      capture_output=True, text=True, check=True).stdout.strip()
  git("init", "-q")
  git("add", ".")
  git("commit", "-qm", "copy")
  assert copied.code_commit() == git("rev-parse", "HEAD")
  module_file.write_text(module_file.read_text() + "\n")
  assert copied.code_commit() == git("rev-parse", "HEAD") + "+modified"


def test_a_compressed_schedule_warms_up_and_decays_within_train_steps():
  """train_steps 81 of num_epochs' 88 steps: warm-up int(0.5 x 44 x 81 / 88) = 20 steps, then
  cosine decay to min_lr at step 81."""
  config = tiny_config()
  config.growth.enabled, config.train_steps = False, 81
  assert train.num_train_steps(config, steps_per_epoch=44) == 81
  schedule = train.learning_rate_schedule(config, steps_per_epoch=44)
  np.testing.assert_allclose(float(schedule(20)), train.peak_learning_rate(config), rtol=1e-6)
  assert float(schedule(19)) < float(schedule(20)) > float(schedule(21))
  np.testing.assert_allclose(float(schedule(81)), config.optim.min_lr, rtol=1e-6)


def _grown_summary(step_flops: list[float]) -> dict:
  """A summary of a run of 88 steps grown at steps 22 and 44, trained at these step FLOPs."""
  events = [{"step": s, "step_flops_before": f,
             "work_flops": {"step": s, "spectrum": 1.0, "split_check": 0.0, "unit_only": 0.0}}
            for s, f in zip((22, 44), step_flops)]
  return {"compute": compute.run_compute(events, 88, step_flops[-1])}


def test_the_compute_matched_step_budget_by_hand():
  """A grown run: 22 steps at 3.0 MFLOPs, 22 at 3.2 and 44 at 3.4, i.e. 66 + 70.4 + 149.6 =
  286 MFLOPs of training. A static whose step costs 3.5 MFLOPs trains floor(286 / 3.5) = 81
  steps on them; one of 2.6 MFLOPs, floor(110) = 110, more than its 88."""
  grown = _grown_summary([3.0e6, 3.2e6, 3.4e6])
  assert grown["compute"]["train_flops"] == 286e6 and grown["compute"]["event_flops"] == 2.0
  assert [(t["from_step"], t["to_step"]) for t in grown["compute"]["train"]] == [
      (0, 22), (22, 44), (44, 88)]
  static_full = config_lib.apply_variant(tiny_config(), "static_full", {})  # sizes unused
  for static_step, steps in ((3.5e6, 81), (2.6e6, 110)):
    static = {"compute": compute.run_compute([], 88, static_step)}
    matched = replicate.compute_matched_config(static_full, static, grown)
    assert matched.train_steps == steps
    config_lib.validate(matched)
  assert config_lib.compute_matched_steps(1.0, 3.5e6) == 1  # at least one step


@TINY_RUN_GROUP
def test_the_tiny_runs_compute_and_its_compute_matched_static(tiny_run):
  """The tiny run's recorded training FLOPs: its one train step's XLA count (slots held from
  the start: one program) times its 88 steps, its events' own work not measured (it measures
  no event); a static_uniform of the tiny config trained on them runs
  floor(88 x grown step / static step) steps."""
  _, summary = tiny_run
  compute_record = summary["compute"]
  grown_step, _, _ = compiled_tiny_step()
  assert compute_record["train"] == [{"from_step": a, "to_step": b, "step_flops": grown_step.flops}
                                     for a, b in ((0, 22), (22, 44), (44, 88))]
  assert compute_record["train_flops"] == 88 * grown_step.flops > 0
  assert compute_record["events"] == [None, None] and compute_record["event_flops"] is None

  config = tiny_config()
  sizes = train.model_sizes(config, input_pipeline.dataset_info(config.data))
  static_config = config_lib.apply_variant(config, "static_uniform", sizes)
  static_step, _, _ = compiled_tiny_step(static_config)
  static = {"compute": compute.run_compute([], 88, static_step.flops)}
  matched = replicate.compute_matched_config(static_config, static, summary)
  assert matched.train_steps == int(88 * grown_step.flops // static_step.flops)
