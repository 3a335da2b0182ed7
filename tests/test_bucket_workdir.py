"""A workdir at a bucket URL (gs://), as pods use: everything the run writes itself goes through
etils.epath, tested here without network on fsspec's in-memory filesystem.

epath sends gs:// paths to TensorFlow's gfile where TensorFlow is installed, else to fsspec;
here epath is told TensorFlow is absent (as EPATH_USE_TF=false tells it) and the fsspec
backend's filesystem is an in-memory one, so the code under test builds, joins and opens the
same gs:// paths it would on Cloud TPU; TensorFlow's gfile is tested apart, on local disk. TensorBoard's
event files (TensorFlow's own gs:// support) and orbax's checkpoints (tensorstore's) reach a
bucket through those libraries, which need the network: they are not exercised here.
"""

import json

from etils import epath
from etils.epath import backend
from etils.epath import gpath
import fsspec
import pytest

from hetscale_jax import export, plots, writers
from hetscale_jax import workdir as workdir_lib

from conftest import TINY_RUN_GROUP, tiny_config

RUN = "gs://bucket/runs/tiny"


@pytest.fixture
def bucket(monkeypatch):
  """The in-memory filesystem that gs:// paths reach for this test."""
  memory = fsspec.filesystem("memory", skip_instance_cache=True)
  memory.store.clear()
  memory.pseudo_dirs[:] = [""]
  # What EPATH_USE_TF=false does, set where epath reads it: it caches the answer at the
  # process's first gs:// path, which another test may have made.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(backend.fsspec_backend, "fs", lambda path: memory)
  return memory


def test_a_bucket_workdir_is_claimed_refused_and_freshened_like_a_local_one(bucket):
  config = tiny_config()
  workdir_lib.claim(RUN, config)
  stored = json.loads((epath.Path(RUN) / workdir_lib.CONFIG_FILE).read_text())
  assert stored == workdir_lib.config_dict(config)
  workdir_lib.claim(RUN, config)  # the same run again: resumable
  config.seed += 1
  with pytest.raises(workdir_lib.WorkdirError, match=r"another config .*seed: 0 -> 1"):
    workdir_lib.claim(RUN, config)
  assert workdir_lib.fresh(RUN) == f"{RUN}/fresh_1"
  assert sorted(p.name for p in epath.Path(RUN).iterdir()) == [workdir_lib.CONFIG_FILE]


@TINY_RUN_GROUP
def test_metrics_summary_plots_and_export_are_written_to_the_bucket(bucket, tiny_run):
  ref_dir, summary = tiny_run
  records = writers.read_jsonl(epath.Path(ref_dir) / workdir_lib.METRICS_FILE)
  writer = writers.JsonlWriter(epath.Path(RUN) / workdir_lib.METRICS_FILE)
  for r in records:
    writer.write_scalars(r["step"], {f"{r['kind']}/{k}": v for k, v in r.items()
                                     if k not in ("kind", "step", "time")})
  writer.close()
  without_time = lambda by_kind: {kind: [{k: v for k, v in r.items() if k != "time"} for r in rs]
                                  for kind, rs in by_kind.items()}
  assert without_time(writers.read_metrics(RUN)) == without_time(writers.read_metrics(ref_dir))

  workdir_lib.write_summary(RUN, summary)
  assert workdir_lib.read_summary(RUN)["eval"] == summary["eval"]

  plots.final_figures(RUN)
  assert (plots.plots_dir(RUN) / plots.TRAINING).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  out = export.export(ref_dir, f"{RUN}/export")
  assert sorted(p.name for p in epath.Path(out).iterdir()) == [
      "architecture.txt", "config.json", "spec.json", "variables.msgpack"]
  assert f"{RUN}/export/variables.msgpack" in bucket.store
  assert not [path for path in bucket.store if "partial" in path]


def test_metrics_are_written_through_tensorflows_gfile(tmp_path):
  """Where TensorFlow is installed, as on Cloud TPU, epath opens a gs:// file through
  TensorFlow's gfile as a context manager rather than a file object: the metrics writer
  takes both (gfile on local disk here, as it would write to the bucket)."""

  class GfilePath:  # the one call the writer makes on its path
    def open(self, mode):
      return backend.tf_backend.open(str(tmp_path / workdir_lib.METRICS_FILE), mode)

  writer = writers.JsonlWriter(GfilePath())
  writer.write_scalars(3, {"train/loss": 0.5, "eval/top1": 0.25})
  writer.close()
  records = writers.read_jsonl(tmp_path / workdir_lib.METRICS_FILE)
  assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
      {"kind": "train", "step": 3, "loss": 0.5}, {"kind": "eval", "step": 3, "top1": 0.25}]
