r"""The evidence study's regime: a narrow reduced DeiT on the embedded 28x28 MNIST subset, where
capacity binds (docs/results.md), grown by each rule at the same steps.

    python -m hetscale_jax.replicate --config configs/study_mnist5k.py --workdir workdirs/study --jobs 2
    python -m hetscale_jax.replicate --config configs/study_mnist5k.py:late \
        --workdir workdirs/study_late --jobs 2

REGIME (the argument) places the growth events; everything else is the same:
  early   epochs 3 and 6 of 30, at 0.99 and 0.93 of the peak learning rate (the default)
  late    epochs 12 and 18 of 30, at 0.69 and 0.37 of it: whether a rule's choice matters
          more where the steps are smaller, with 12 epochs (40% of training) still left
          after the last event for the units to train
"""

from hetscale_jax import config_lib

GROWTH_EPOCHS = {"early": (3.0, 6.0), "late": (12.0, 18.0)}


def get_config(regime="early"):
  if regime not in GROWTH_EPOCHS:
    raise ValueError(f"regime {regime!r}: choose one of {list(GROWTH_EPOCHS)}")
  c = config_lib.small_config("mnist5k")
  c.model.patch_size = 7          # 28x28 -> 16 patches + class token
  c.model.head_dim = 1            # bottleneck: full width would be 16 per head
  c.model.mlp_dim = 4             # bottleneck: full width would be 256
  c.num_epochs = 30
  c.optim.warmup_epochs = 1.0

  c.growth.epochs = GROWTH_EPOCHS[regime]
  c.growth.budget_per_event = 2_000  # below every layer's cap in sum: the rules must choose
  c.growth.unit_only_steps = 50      # the next 50 batches: as many steps as post_event_loss averages
  c.growth.held_aside_batches = 4    # 256 of the 1,000 test images

  c.log_every_steps = 10
  c.eval_every_epochs = float(c.num_epochs)  # once, at the end
  c.checkpoint_every_steps = 500
  return c
