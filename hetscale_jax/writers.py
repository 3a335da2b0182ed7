"""Metrics a person can plot: TensorBoard event files and one JSON line per record.

Only process 0 writes, so a multi-host run produces one copy.
"""

import json
import os
import time

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only the writer needs TF)
    self._tf = tf
    os.makedirs(workdir, exist_ok=True)
    self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, kind: str, step: int, values: dict):
    """One record: scalars go to TensorBoard as kind/name, everything to metrics.jsonl."""
    if not self._enabled:
      return
    record = {"kind": kind, "step": int(step), "time": time.time(), **values}
    self._jsonl.write(json.dumps(record, default=float) + "\n")
    self._jsonl.flush()
    with self._summary.as_default(step=int(step)):
      for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tf.summary.scalar(f"{kind}/{name}", value)
    self._summary.flush()

  def close(self):
    if self._enabled:
      self._jsonl.close()
      self._summary.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
