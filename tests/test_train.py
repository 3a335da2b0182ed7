"""The training loop: recipe pieces, a few steps on a fixed batch, and a run with growth."""

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hetscale_jax import input_pipeline, sharding, train, writers

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_test", CONFIG_DIR / "tiny_test.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_classification_sums_on_a_hand_made_case():
  logits = jnp.array([
      [5.0, 1, 0, 0, 0, 0, 0],   # label 0: top-1
      [0.0, 1, 2, 3, 4, 5, 6],   # label 2: four classes above, so top-5 but not top-1
      [0.0, 1, 2, 3, 4, 5, 6],   # label 0: six classes above: neither
      [9.0, 0, 0, 0, 0, 0, 0],   # padding: must not count
  ])
  labels = jnp.array([0, 2, 0, 1])
  mask = jnp.array([1.0, 1, 1, 0])
  sums = train.classification_sums(logits, labels, mask)
  log_softmax = jax.nn.log_softmax(logits)
  expected_loss = -(log_softmax[0, 0] + log_softmax[1, 2] + log_softmax[2, 0])
  assert float(sums["top1"]) == 1 and float(sums["top5"]) == 2 and float(sums["count"]) == 3
  np.testing.assert_allclose(float(sums["loss"]), float(expected_loss), rtol=1e-6)


def test_learning_rate_schedule_follows_the_deit_recipe():
  config = tiny_config()
  config.batch_size, config.num_epochs = 256, 10
  config.optim.base_lr, config.optim.warmup_epochs = 5e-4, 2.0
  schedule = train.learning_rate_schedule(config, steps_per_epoch=100)
  np.testing.assert_allclose(float(schedule(0)), config.optim.warmup_lr, rtol=1e-4)
  np.testing.assert_allclose(float(schedule(200)), 5e-4 * 256 / 512, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1000)), config.optim.min_lr, rtol=1e-6)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mix_batch_keeps_targets_normalised_and_consistent_with_the_images(use_cutmix):
  mix = ml_collections.ConfigDict(dict(mixup_alpha=0.0 if use_cutmix else 0.8,
                                       cutmix_alpha=1.0 if use_cutmix else 0.0,
                                       switch_prob=0.5, prob=1.0))
  # Image i is constant i, so the mixed image's mean reveals the share of each source.
  images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 8, 8, 1))
  targets = train.soft_targets(jnp.arange(4), 4, 0.0)
  for seed in range(5):
    mixed, mixed_targets = train.mix_batch(jax.random.PRNGKey(seed), images, targets, mix)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    lam = mixed_targets[0, 0]
    np.testing.assert_allclose(float(mixed[0].mean()), float(lam * 0 + (1 - lam) * 3), atol=1e-5)
    np.testing.assert_allclose(float(mixed_targets[0, 3]), float(1 - lam), atol=1e-6)


def test_mix_batch_with_prob_zero_changes_nothing():
  mix = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.0))
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  targets = train.soft_targets(jnp.arange(4), 4, 0.1)
  mixed, mixed_targets = train.mix_batch(jax.random.PRNGKey(1), images, targets, mix)
  assert (mixed == images).all() and (mixed_targets == targets).all()


def compiled_tiny_step():
  """(compiled train step, initial state, one training batch) of the tiny config."""
  config = tiny_config()
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


def test_non_finite_step_is_skipped_and_reported_with_its_step():
  step, state, batch = compiled_tiny_step()
  state, _ = step.fn(state, batch)
  params_before = jax.device_get(state.params)
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
  state, _ = step.fn(state, bad)
  unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), params_before, jax.device_get(state.params))
  assert all(jax.tree.leaves(unchanged)), "a non-finite step must not change the params"
  with pytest.raises(train.NonFiniteError, match="not finite at step 1"):
    train.check_finite(state)


def test_training_run_grows_by_the_plan_and_keeps_learning(tmp_path):
  config = tiny_config()
  summary = train.train_and_evaluate(config, str(tmp_path))
  events = summary["growth_events"]
  assert [e["step"] for e in events] == [22, 44]
  for event in events:
    assert event["params_after"] - event["params_before"] == event["plan_params"] > 0
  assert summary["params"] == events[-1]["params_after"]
  assert summary["train_step_compiles"] == 1 + len(events)
  records = writers.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  after_growth = [r["loss"] for r in records if r["kind"] == "train" and r["step"] > events[0]["step"]]
  assert min(after_growth) < losses[0]
  assert summary["eval"]["top1"] > 0.2  # 10 classes: chance is 0.1
  assert os.listdir(os.path.join(tmp_path, "tensorboard"))
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["params"] == summary["params"]
  grown_units = sum(sum(layer["units"]) for layer in summary["architecture"]["layers"].values())
  assert grown_units == sum(sum(e["grown"].values()) for e in events)
