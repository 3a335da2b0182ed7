r"""The evidence study's regime: a narrow reduced DeiT on the embedded 28x28 MNIST subset, where
capacity binds (README, "Results"), grown by each rule at the same steps.

    python -m hetscale_jax.replicate --config configs/study_mnist5k.py --workdir workdirs/study --jobs 2
"""

from hetscale_jax import config_lib


def get_config():
  c = config_lib.small_config("mnist5k")
  c.model.patch_size = 7          # 28x28 -> 16 patches + class token
  c.model.head_dim = 1            # bottleneck: full width would be 16 per head
  c.model.mlp_dim = 4             # bottleneck: full width would be 256
  c.num_epochs = 30
  c.optim.warmup_epochs = 1.0

  c.growth.epochs = (3.0, 6.0)
  c.growth.budget_per_event = 2_000  # below every layer's cap in sum: the rules must choose

  c.log_every_steps = 10
  c.eval_every_epochs = float(c.num_epochs)  # once, at the end
  c.checkpoint_every_steps = 500
  return c
