r"""A few seconds of training on the digits with two growth events: for tests and smoke checks.

The small configs' recipe (config_lib.small_config) at a quarter of its width and half its
depth, with a short schedule, grown by the released mechanism (row_sum, linear units, by_kind
quotas): the tests that share its run (resume, kills, sharding, training) exercise that path,
and the study test trains the paper's text beside it."""

from hetscale_jax import config_lib


def get_config():
  c = config_lib.small_config("digits")
  c.model.patch_size = 4
  c.model.width = 16
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.head_dim = 4
  c.model.mlp_dim = 16
  c.batch_size = 32
  c.num_epochs = 2
  c.optim.base_lr = 5e-2
  c.optim.warmup_epochs = 0.5
  c.growth.epochs = (0.5, 1.0)
  c.growth.budget_per_event = 200
  c.growth.update(config_lib.GROWN_VARIANTS["authors"])
  c.growth.num_iters = 8
  c.growth.slots = "schedule"     # the shared test run trains the slots-from-the-start path
  c.log_every_steps = 10
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 20
  c.compilation_cache_dir = ""
  return c
