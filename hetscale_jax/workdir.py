"""A run's workdir: what it holds, who may write there, and the summary that marks it finished.

    workdir.claim(path, config)      # refuses a workdir of another run, before any work
    path = workdir.fresh(path)       # a new sub-workdir if `path` holds anything
    workdir.write_summary(path, s)   # summary.json: the run is finished
    workdir.read_summary(path)       # that summary, or None

A workdir is any path etils.epath opens: local, a network file system, or a gs:// bucket.

Layout:

  config.json           the run's config, written when the workdir is claimed. A later run on
                        this workdir must have the same config, RESUMABLE_FIELDS aside
                        (and the growth fields, where neither grows).
  summary.json          the final summary (train.write_summary): present once the run finished,
                        with the code's commit (code_commit)
  metrics.jsonl         one JSON record per log step, evaluation and growth event (writers)
  tensorboard/          the same scalars for TensorBoard (writers)
  plots/                figures (plots)
  checkpoints/<step>/   orbax checkpoints (checkpoint.py)
  corrupt_checkpoints/  newer checkpoints that failed to restore, moved out of the way
  fresh_<n>/            a new run's sub-workdir (main.py --fresh)
"""

import json
import os
import subprocess
import uuid

from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils

from hetscale_jax import distributed

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


def _refusal_of_path(path: epath.Path) -> str | None:
  if path.exists() and not path.is_dir():
    return (f"workdir {path} is a file, not a directory; nothing was written. Choose a new or "
            "empty --workdir.")
  return None


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


# What a claim killed midway leaves: still an unclaimed workdir.
_TEMPORARY = CONFIG_FILE + ".tmp"
_PROBE_PREFIX = ".shared_probe_"


def _refusal_of_workdir(path: epath.Path, current: dict) -> str | None:
  """Why this run may not use `path` (read by process 0 alone), or None."""
  if (refusal := _refusal_of_path(path)) is not None:
    return refusal
  try:
    if (stored := stored_config(str(path))) is not None:
      refuse_other_config(f"workdir {path}", stored, current)
      return None
  except WorkdirError as e:
    return str(e)
  if path.exists() and any(p.name != _TEMPORARY and not p.name.startswith(_PROBE_PREFIX)
                           for p in path.iterdir()):
    return (f"workdir {path} is not empty and holds no hetscale_jax run ({CONFIG_FILE} is "
            "missing); nothing was changed. Choose a new or empty --workdir (main.py --fresh "
            "picks a new sub-workdir).")
  return None


def _refusal_of_other_configs(current: dict) -> str | None:
  """Why this process's config may not join process 0's run, or None."""
  first = json.loads(distributed.broadcast_text(json.dumps(current)))
  differences = config_differences(first, current)
  if differences:
    return (f"process {jax.process_index()} was started with another config than process 0 "
            f"(process 0 -> {jax.process_index()}): {'; '.join(differences)}; nothing was "
            "written. Start every process with the same --config and overrides.")
  return None


def _refusal_of_unshared(path: epath.Path) -> str | None:
  """Whether every process sees what process 0 writes at `path`; leaves nothing behind."""
  if jax.process_count() == 1:
    return None
  probe = path / (_PROBE_PREFIX + distributed.broadcast_text(uuid.uuid4().hex))
  created = False
  if jax.process_index() == 0:
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
  multihost_utils.sync_global_devices("hetscale_jax probe_workdir")
  refusal = distributed.first_error(
      None if probe.exists() else
      f"workdir {path} is not shared: process {jax.process_index()} does not see what process "
      "0 writes there; nothing was written. Pass a --workdir that every process sees at the "
      "same path (a gs:// bucket, or a network file system).")
  if jax.process_index() == 0:
    probe.unlink()
    if refusal and created:
      path.rmdir()
  return refusal


def _raise_any(refusal: str | None) -> None:
  if (refusal := distributed.first_error(refusal)) is not None:
    raise WorkdirError(refusal)


def claim(workdir: str, config) -> None:
  """Makes `workdir` this run's: fine if new, empty or holding a run of the same config.

  Raises WorkdirError on every process, having written nothing, if it is a file, holds another
  config's run or files that are not a run, if the processes were started with different
  configs, or if they do not share the workdir. Otherwise process 0 writes config.json (if
  missing) before any training. Every process takes the same steps whatever the workdir holds
  and whenever it started: process 0 reads the workdir and decides, and the others learn its
  decision from it, never from a file that may or may not be written yet.
  """
  path = epath.Path(workdir)
  current = config_dict(config)
  _raise_any(_refusal_of_other_configs(current))
  _raise_any(_refusal_of_workdir(path, current) if jax.process_index() == 0 else None)
  _raise_any(_refusal_of_unshared(path))
  if jax.process_index() == 0 and not (path / CONFIG_FILE).exists():
    temporary = path / _TEMPORARY
    path.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(current, indent=1, sort_keys=True))
    temporary.rename(path / CONFIG_FILE)
  multihost_utils.sync_global_devices("hetscale_jax claim_workdir")


def fresh(workdir: str) -> str:
  """`workdir` if it is new or empty, else its first free sub-workdir fresh_1, fresh_2, ...:
  a place for a new run that touches nothing of what `workdir` holds. Process 0 chooses; every
  process gets its choice."""
  chosen, refusal = workdir, None
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    refusal = _refusal_of_path(path)
    if refusal is None and path.exists() and any(path.iterdir()):
      n = 1
      while (path / f"{FRESH_PREFIX}{n}").exists():
        n += 1
      chosen = str(path / f"{FRESH_PREFIX}{n}")
  _raise_any(refusal)
  return distributed.broadcast_text(chosen)


def summary_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / SUMMARY_FILE


def read_summary(workdir: str) -> dict | None:
  """The summary of a finished run, or None if the run has not finished."""
  path = summary_path(workdir)
  return json.loads(path.read_text()) if path.exists() else None


def code_commit() -> str | None:
  """The git commit of the checkout this package runs from, "+modified" added if its tracked
  files differ from that commit; None for an installed package (no checkout of its own)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True,
                                     text=True, check=True).stdout.strip()
  try:
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return None  # inside some other repository, such as a virtual environment in one
    modified = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD") + ("+modified" if modified else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def write_summary(workdir: str, summary: dict) -> None:
  """Writes summary.json (process 0), which marks the run finished."""
  if jax.process_index() == 0:
    summary_path(workdir).write_text(json.dumps(summary, indent=1, default=float))
