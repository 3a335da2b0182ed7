"""A run's workdir: what it holds, who may write there, and the summary that marks it finished.

    workdir.claim(path, config)      # refuses a workdir of another run, before any work
    path = workdir.fresh(path)       # a new sub-workdir if `path` holds anything
    workdir.write_summary(path, s)   # summary.json: the run is finished
    workdir.read_summary(path)       # that summary, or None

Layout:

  config.json           the run's config, written when the workdir is claimed. A later run on
                        this workdir must have the same config, RESUMABLE_FIELDS aside
                        (and the growth fields, where neither grows).
  summary.json          the final summary (train.write_summary): present once the run finished
  metrics.jsonl         one JSON record per log step, evaluation and growth event (writers)
  tensorboard/          the same scalars for TensorBoard (writers)
  plots/                figures (plots)
  checkpoints/<step>/   orbax checkpoints (checkpoint.py)
  corrupt_checkpoints/  newer checkpoints that failed to restore, moved out of the way
  fresh_<n>/            a new run's sub-workdir (main.py --fresh)
"""

import json
import os

from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
FRESH_PREFIX = "fresh_"

# Config fields a resumed run may change: where and how often it reports and saves, and how
# the devices and data are reached. Any other difference means another run.
RESUMABLE_FIELDS = ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
                    "keep_checkpoints", "compilation_cache_dir", "mesh.fsdp", "data.prefetch",
                    "data.data_dir", "data.manual_dir")


class WorkdirError(RuntimeError):
  """The workdir holds something else than this run; nothing in it was changed."""


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists), as stored in the workdir."""
  return json.loads(config.to_json(sort_keys=True))


def config_differences(stored: dict, current: dict) -> list[str]:
  """'field: stored -> current' for every field that differs, RESUMABLE_FIELDS aside, and the
  growth fields aside when neither config grows."""
  old, new = (traverse_util.flatten_dict(c, sep=".") for c in (stored, current))
  missing = "(absent)"
  # A run that does not grow computes nothing from its other growth fields, so studies that
  # differ only in when they grow share their static runs (replicate --static_workdir).
  neither_grows = not old.get("growth.enabled") and not new.get("growth.enabled")
  ignored = lambda k: k in RESUMABLE_FIELDS or (neither_grows and k.startswith("growth."))
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
          for k in sorted(old.keys() | new.keys())
          if not ignored(k) and old.get(k, missing) != new.get(k, missing)]


def refuse_other_config(where: str, stored: dict, current: dict) -> None:
  """WorkdirError naming the differing fields if `stored` is another run's config."""
  differences = config_differences(stored, current)
  if differences:
    raise WorkdirError(
        f"{where} belongs to a run of another config (workdir -> this run): "
        f"{'; '.join(differences)}. Resume it with its own config, or start this run in a new "
        "--workdir (main.py --fresh picks a new sub-workdir).")


def _require_local_directory(workdir: str) -> None:
  # Metrics, plots and summaries are written with Python's file functions, which would turn
  # gs://bucket/run into a local directory named "gs:".
  if "://" in workdir:
    raise WorkdirError(
        f"workdir {workdir}: URLs are not supported; nothing was written. Mount the bucket "
        "(e.g. `gcsfuse BUCKET /mnt/BUCKET` on every worker) and pass the mounted path.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; nothing was written. "
                       "Choose a new or empty --workdir.")


def stored_config(workdir: str) -> dict | None:
  """The config.json of the run in `workdir`, None if it holds none (WorkdirError if it is not
  readable)."""
  marker = epath.Path(workdir) / CONFIG_FILE
  if not marker.exists():
    return None
  try:
    return json.loads(marker.read_text())
  except ValueError as e:
    raise WorkdirError(f"{marker} is not a readable config ({e}); nothing was changed") from None


def claim(workdir: str, config) -> None:
  """Makes `workdir` this run's: fine if new, empty or holding a run of the same config.

  Raises WorkdirError, having written nothing, if it is a URL or a file, or holds another
  config's run or files that are not a run. Otherwise writes config.json (if missing) before
  any training.
  """
  _require_local_directory(workdir)
  path = epath.Path(workdir)
  marker = path / CONFIG_FILE
  current = config_dict(config)
  if (stored := stored_config(workdir)) is not None:
    refuse_other_config(f"workdir {workdir}", stored, current)
    return
  # A claim killed before its rename leaves only the temporary file: still an unclaimed workdir.
  temporary = marker.parent / (CONFIG_FILE + ".tmp")
  if path.exists() and any(p.name != temporary.name for p in path.iterdir()):
    raise WorkdirError(
        f"workdir {workdir} is not empty and holds no hetscale_jax run ({CONFIG_FILE} is "
        "missing); nothing was changed. Choose a new or empty --workdir (main.py --fresh picks "
        "a new sub-workdir).")
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(current, indent=1, sort_keys=True))
    temporary.rename(marker)
  multihost_utils.sync_global_devices("hetscale_jax claim_workdir")


def fresh(workdir: str) -> str:
  """`workdir` if it is new or empty, else its first free sub-workdir fresh_1, fresh_2, ...:
  a place for a new run that touches nothing of what `workdir` holds."""
  _require_local_directory(workdir)
  path = epath.Path(workdir)
  chosen = workdir
  if path.exists() and any(path.iterdir()):
    n = 1
    while (path / f"{FRESH_PREFIX}{n}").exists():
      n += 1
    chosen = str(path / f"{FRESH_PREFIX}{n}")
  # Every process of a multi-host run looks before any claims (and creates) the one chosen:
  # a process still looking after another's claim would pick the next sub-workdir.
  multihost_utils.sync_global_devices("hetscale_jax fresh_workdir")
  return chosen


def summary_path(workdir: str) -> str:
  return os.path.join(workdir, SUMMARY_FILE)


def read_summary(workdir: str) -> dict | None:
  """The summary of a finished run, or None if the run has not finished."""
  if not os.path.exists(summary_path(workdir)):
    return None
  with open(summary_path(workdir)) as f:
    return json.load(f)


def write_summary(workdir: str, summary: dict) -> None:
  """Writes summary.json (process 0), which marks the run finished."""
  if jax.process_index() == 0:
    with open(summary_path(workdir), "w") as f:
      json.dump(summary, f, indent=1, default=float)
