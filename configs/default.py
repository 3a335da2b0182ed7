r"""Embedded default: a small reduced DeiT grown on the 8x8 UCI digits, minutes on a CPU.

    python main.py                                   # this config
    python main.py --config.growth.rule=random       # the same run, random neurons grown
"""

from hetscale_jax import config_lib


def get_config():
  c = config_lib.small_config("digits")
  c.model.patch_size = 4          # 8x8 digits -> 4 patches + class token
  c.model.head_dim = 8            # bottleneck: full width would be 16 per head
  c.model.mlp_dim = 64            # bottleneck: full width would be 256
  c.num_epochs = 40
  c.optim.warmup_epochs = 2.0

  c.growth.epochs = (8.0, 16.0, 24.0)
  c.growth.target_params = 120_000
  c.growth.slots = "schedule"     # every unit slot from the start: no event recompiles

  c.log_every_steps = 100
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 200
  return c
