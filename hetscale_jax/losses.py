"""The training objective: smoothed targets, Mixup / CutMix of a batch, cross-entropy, and
the sums that evaluation adds up over batches. Pure jnp functions, used inside jitted steps."""

import jax
import jax.numpy as jnp
import optax


def soft_targets(labels, num_classes: int, smoothing: float):
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def cutmix_mask(rng, height: int, width: int, lam):
  """Box of area about (1 - lam) at a uniform centre, clipped to the image (as timm)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(rng, (2,), 0, jnp.array([height, width]))
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = ((ys >= cy - cut_h // 2) & (ys < cy + cut_h - cut_h // 2)
            & (xs >= cx - cut_w // 2) & (xs < cx + cut_w - cut_w // 2))
  return inside


def mix_batch(rng, images, targets, mixup_config):
  """Mixup or CutMix of each example with its mirror in the batch (timm's batch mode).

  Returns mixed images and targets; lam is corrected to the clipped box area for CutMix.
  """
  c = mixup_config
  if c.prob == 0 or (c.mixup_alpha == 0 and c.cutmix_alpha == 0):
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  lam_mix = jax.random.beta(k_mix, c.mixup_alpha, c.mixup_alpha) if c.mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, c.cutmix_alpha, c.cutmix_alpha) if c.cutmix_alpha > 0 else 1.0
  if c.mixup_alpha > 0 and c.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < c.switch_prob
  else:
    use_cutmix = jnp.asarray(c.cutmix_alpha > 0)
  box = cutmix_mask(k_box, images.shape[1], images.shape[2], lam_cut)
  lam_box = 1.0 - jnp.mean(box)
  flipped = images[::-1]
  cut = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  apply = jax.random.uniform(k_apply) < c.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  images = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images).astype(images.dtype)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def classification_sums(logits, labels, mask):
  """Summed loss (plain cross-entropy), top-1 and top-5 hits and count over unmasked rows."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
  rank = jnp.sum(logits > true_logit, axis=1)  # classes scored strictly above the label
  return {"loss": jnp.sum(loss * mask), "top1": jnp.sum((rank < 1) * mask),
          "top5": jnp.sum((rank < 5) * mask), "count": jnp.sum(mask)}
