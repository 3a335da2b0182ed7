"""The training objective (hetscale_jax.losses): evaluation sums, label smoothing, Mixup and
CutMix."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hetscale_jax import losses


def test_classification_sums_on_a_hand_made_case():
  logits = jnp.array([
      [5.0, 1, 0, 0, 0, 0, 0],   # label 0: top-1
      [0.0, 1, 2, 3, 4, 5, 6],   # label 2: four classes above, so top-5 but not top-1
      [0.0, 1, 2, 3, 4, 5, 6],   # label 0: six classes above: neither
      [9.0, 0, 0, 0, 0, 0, 0],   # padding: must not count
  ])
  labels = jnp.array([0, 2, 0, 1])
  mask = jnp.array([1.0, 1, 1, 0])
  sums = losses.classification_sums(logits, labels, mask)
  log_softmax = jax.nn.log_softmax(logits)
  expected_loss = -(log_softmax[0, 0] + log_softmax[1, 2] + log_softmax[2, 0])
  assert float(sums["top1"]) == 1 and float(sums["top5"]) == 2 and float(sums["count"]) == 3
  np.testing.assert_allclose(float(sums["loss"]), float(expected_loss), rtol=1e-6)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mix_batch_keeps_targets_normalised_and_consistent_with_the_images(use_cutmix):
  mix = ml_collections.ConfigDict(dict(mixup_alpha=0.0 if use_cutmix else 0.8,
                                       cutmix_alpha=1.0 if use_cutmix else 0.0,
                                       switch_prob=0.5, prob=1.0))
  # Image i is constant i, so the mixed image's mean reveals the share of each source.
  images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 8, 8, 1))
  targets = losses.soft_targets(jnp.arange(4), 4, 0.0)
  for seed in range(5):
    mixed, mixed_targets = losses.mix_batch(jax.random.PRNGKey(seed), images, targets, mix)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    lam = mixed_targets[0, 0]
    np.testing.assert_allclose(float(mixed[0].mean()), float(lam * 0 + (1 - lam) * 3), atol=1e-5)
    np.testing.assert_allclose(float(mixed_targets[0, 3]), float(1 - lam), atol=1e-6)


def test_mix_batch_with_prob_zero_changes_nothing():
  mix = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.0))
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  targets = losses.soft_targets(jnp.arange(4), 4, 0.1)
  mixed, mixed_targets = losses.mix_batch(jax.random.PRNGKey(1), images, targets, mix)
  assert (mixed == images).all() and (mixed_targets == targets).all()
