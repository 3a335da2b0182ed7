"""Trains (and grows) a DeiT: `python main.py --config configs/deit_s_in100.py --workdir DIR`.

With no flags it trains and grows a small DeiT on the embedded digits data in minutes on CPU.
Any config field can be overridden: `--config.num_epochs=10 --config.growth.rule=random`.
Running the same command again resumes the run from its workdir's newest checkpoint; a workdir
of another run is refused, and --fresh starts a new run in a new sub-workdir of it instead.
"""

import logging as std_logging
import os
import re
import sys

# TensorFlow only feeds data here: keep its start-up chatter out of the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
# The parser DEFINE_config_file uses, public in the module that defines it.
from ml_collections.config_flags.config_flags import ConfigFileFlagParser
import tensorflow as tf

from hetscale_jax import checkpoint
from hetscale_jax import config_lib
from hetscale_jax import distributed
from hetscale_jax import input_pipeline
from hetscale_jax import train
from hetscale_jax import workdir as workdir_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def config_file(argv: list[str]) -> str:
  """The config file (with its ":variant") that --config names in argv, else the default."""
  for i, arg in enumerate(argv):
    if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
      return argv[i + 1]
    if match := re.fullmatch(r"--?config=(.*)", arg):
      return match.group(1)
  return _DEFAULT_CONFIG


def check_overrides(argv: list[str]) -> None:
  """ConfigError naming the first --config.<field> of argv that the config does not have.

  Run before the flags are defined: ml_collections parses the overrides then and would stop
  at an unknown one with a bare KeyError naming only its last key.
  """
  config = ConfigFileFlagParser("config").parse(config_file(argv))
  for arg in argv[1:]:
    if match := re.match(r"--?(?:no)?config\.([^=]+)", arg):
      config_lib.check_field_path(config, match.group(1))


def define_flags():
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go "
                      "(default: workdirs/<config name>).")
  flags.DEFINE_bool("fresh", False, "Start a new run even if --workdir holds one: in a new "
                    "sub-workdir <workdir>/fresh_<n>, leaving what is there untouched.")


def _not_orbax_info(record) -> bool:
  # orbax logs dozens of INFO lines per checkpoint; its warnings and errors still show.
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Before anything touches a device: one process of a multi-host run joins the others here.
  distributed.maybe_initialize()
  logging.get_absl_handler().addFilter(_not_orbax_info)
  # tf.data only: a full TensorFlow install would otherwise reserve the GPUs' memory.
  tf.config.set_visible_devices([], "GPU")
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  logging.info("config:\n%s", config)
  try:
    train.train_and_evaluate(config, workdir, fresh=flags.FLAGS.fresh)
  except (config_lib.ConfigError, input_pipeline.DatasetNotFoundError, workdir_lib.WorkdirError,
          checkpoint.CheckpointError, train.NonFiniteError) as e:
    sys.exit(f"error: {e}")
  except Exception:
    distributed.wait_for_watchdog()  # a lost process ends this one here, with its own line
    raise


if __name__ == "__main__":
  try:
    check_overrides(sys.argv)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  define_flags()
  app.run(main)
