"""Metrics a person can plot: TensorBoard event files and one JSON line per record.

    writer = writers.create(workdir)
    writer.write_scalars(step, {"train/loss": 0.5, "train/lr": 1e-3})
    writer.close()

clu's SummaryWriter writes TensorBoard's event files; `JsonlWriter` adds metrics.jsonl, which
`read_metrics` reads back without TensorBoard (for plots, report, evidence). Only process 0
writes, so a multi-host run produces one copy.
"""

from collections.abc import Mapping
import contextlib
import json
import time
from typing import Any

from clu import metric_writers
from etils import epath
import jax

from hetscale_jax import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one line {"kind", "step", "time", name: value, ...} per kind and write_scalars
  call, a scalar named "kind/name" going to its kind's line; a name without a kind (clu's
  ReportProgress writes steps_per_sec and uptime) goes to kind "progress".

  Kept beside clu's writers because clu has no plain-file writer; only scalars are written.
  """

  def __init__(self, path: epath.Path):
    # Entered, not just called: epath's TensorFlow backend (gs:// where TensorFlow is
    # installed) opens a file as a context manager, not as a file object.
    self._open = contextlib.ExitStack()
    self._file = self._open.enter_context(path.open("a"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    records = {}
    for key, value in scalars.items():
      kind, _, name = key.rpartition("/")
      kind = kind or "progress"
      records.setdefault(kind, {"kind": kind, "step": int(step), "time": time.time()})[name] = value
    for record in records.values():
      self._file.write(json.dumps(record, default=float) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._open.close()


def create(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard files in <workdir>/tensorboard and <workdir>/metrics.jsonl (process 0)."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(str(path / workdir_lib.TENSORBOARD_DIR)),
      JsonlWriter(path / workdir_lib.METRICS_FILE)])


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def read_metrics(workdir: str) -> dict[str, list[dict]]:
  """metrics.jsonl by kind ("train", "eval", "growth"), ordered by step.

  A resumed run appends records for steps it replays; the last record of a (kind, step) wins.
  """
  latest = {}
  for r in read_jsonl(epath.Path(workdir) / workdir_lib.METRICS_FILE):
    latest[r["kind"], r["step"]] = r
  return {kind: [latest[k] for k in sorted(k for k in latest if k[0] == kind)]
          for kind in ("train", "eval", "growth")}
