r"""Embedded default: a small reduced DeiT grown on the 8x8 UCI digits, minutes on a CPU.

    python main.py                                   # this config
    python main.py --config.growth.rule=random       # the same run, random neurons grown
"""

from hetscale_jax import config_lib


def get_config():
  c = config_lib.base_config("digits")
  c.model.variant = "Ti"
  c.model.patch_size = 4          # 8x8 digits -> 4 patches + class token
  c.model.width = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.head_dim = 8            # bottleneck: full width would be 16 per head
  c.model.mlp_dim = 64            # bottleneck: full width would be 256
  c.model.drop_path_rate = 0.0
  c.batch_size = 64
  c.num_epochs = 40
  c.optim.base_lr = 3e-2          # at batch 512: peak lr 3.75e-3 at batch 64
  c.optim.warmup_epochs = 2.0
  c.mixup.prob = 0.0              # 1,437 8x8 images: mixing only slows learning here

  c.growth.enabled = True
  c.growth.epochs = (8.0, 16.0, 24.0)
  c.growth.target_params = 120_000
  c.growth.max_layer_fraction = 0.5
  c.growth.num_iters = 12

  c.log_every_steps = 100
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 200
  return c
