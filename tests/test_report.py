"""The report over two real (tiny) training runs, its FLOPs count, and the plot hooks."""

import json
import os
import pathlib
import re
import signal
import threading
import time

from flax import traverse_util
import jax
import jax.extend.core
import numpy as np
import pytest

from hetscale_jax import config_lib, evidence, grow, layers, plots, replicate, report, spec
from hetscale_jax import workdir as workdir_lib
from hetscale_jax.layers import GROWTH_COLLECTION
from hetscale_jax.splitting import random_spectrum

from conftest import make_deit, read_checkpoint, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One worker runs this module's tests, so that the study fixture is trained once (minutes).
pytestmark = pytest.mark.xdist_group("study")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """The replication study end to end at a tiny size: one seed of the paper's text, its split
  and noise-floor variants, the released mechanism and the static reduced model, trained in
  worker processes as `python -m hetscale_jax.replicate` trains them (one event: the
  spectrum's compilation dominates a tiny run, and the variants of the paper's text reuse it
  from the study's cache). Returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("study"))
  _, unfinished = replicate.run_study(study_config(), workdir, seeds=1, jobs=1,
                                      variants=STUDY_VARIANTS, post_event_steps=5)
  assert not unfinished
  return workdir


STUDY_VARIANTS = ["splitting", "split", "noise_floor", "authors", "static_reduced"]


def study_config():
  config = tiny_config()
  config.growth.epochs = (1.0,)
  config.checkpoint_every_steps = 1000  # checkpoints: the growth event's and the last step's
  config.growth.unit_only_steps = 3
  config.growth.held_aside_batches = 2
  config.growth.slots = "events"  # a study's pairing (replicate refuses "schedule")
  return config


def test_report_only_renders_the_finished_runs_and_trains_nothing(study):
  """A second seed and a variant asked for but not trained: the report says how many runs
  finished, claims no way of training them, and no run directory of them appears."""
  text, unfinished = replicate.run_study(study_config(), study, seeds=2, jobs=1,
                                         variants=STUDY_VARIANTS + ["random"], post_event_steps=5,
                                         report_only=True)
  assert not unfinished
  assert "**5 of 12 runs finished: a report of a study in progress.**" in text
  assert "| random | 0/2 |" in text and "run(s) at a time" not in text
  assert f"Code: commit {workdir_lib.code_commit()} (5 runs)." in text
  assert "| top1 | authors - splitting | 1 |" in text
  untrained = [(v, 1) for v in STUDY_VARIANTS] + [("random", 0), ("random", 1)]
  assert not any(os.path.exists(replicate.run_dir(study, v, s)) for v, s in untrained)


def test_a_study_that_grows_later_reads_the_static_runs_of_another(study, tmp_path):
  """--static_workdir: the static runs of a study that differs only in when it grows are read,
  not trained again; a static run of another config is refused before any work."""
  later = study_config()
  later.growth.epochs = (1.5,)
  workdir = str(tmp_path / "later")
  text, unfinished = replicate.run_study(later, workdir, seeds=1, jobs=1,
                                         variants=["static_reduced"], post_event_steps=5,
                                         static_workdir=study)
  assert not unfinished
  assert not os.path.exists(os.path.join(workdir, "static_reduced"))
  assert "| static_reduced | 1/1 |" in text  # the final results' row: the run was found
  assert "runs finished" not in text  # every run asked for is there: not a study in progress
  other = study_config()
  other.model.mlp_dim = 24
  with pytest.raises(workdir_lib.WorkdirError, match=r"another config .*model.mlp_dim: 16 -> 24"):
    replicate.run_study(other, str(tmp_path / "other"), seeds=1, jobs=1,
                        variants=["static_reduced"], post_event_steps=5, static_workdir=study)
  assert not os.path.exists(tmp_path / "other")


def test_a_study_archived_on_one_machine_goes_on_on_another(study, tmp_path):
  """--archive: the finished runs go into one archive (once: a second call adds none), and a
  study in a new workdir restores them, trains none of them again and reports the same
  tables; an archive of another config's runs is refused before anything is written."""
  archive = str(tmp_path / "archive")
  kwargs = dict(seeds=1, jobs=1, variants=STUDY_VARIANTS, post_event_steps=5, archive=archive)
  text, _ = replicate.run_study(study_config(), study, report_only=True, **kwargs)
  replicate.run_study(study_config(), study, report_only=True, **kwargs)
  (archived,) = os.listdir(archive)
  assert re.fullmatch(r"runs-[-0-9]+\.tar\.gz", archived)
  assert sorted(replicate.read_archive(archive)) == [(v, 0) for v in sorted(STUDY_VARIANTS)]

  elsewhere = str(tmp_path / "elsewhere")
  text_elsewhere, unfinished = replicate.run_study(study_config(), elsewhere, **kwargs)
  assert not unfinished
  assert not os.path.exists(os.path.join(elsewhere, "splitting", "seed0", "checkpoints"))
  tables = lambda text: text[text.index("K = "):]
  assert tables(text_elsewhere) == tables(text)
  assert os.listdir(archive) == [archived]

  other = study_config()
  other.model.mlp_dim = 24
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"archived run .*seed0 .* another config .*model.mlp_dim: 16 -> 24"):
    replicate.run_study(other, str(tmp_path / "other"), **kwargs)
  assert not os.path.exists(tmp_path / "other")


def test_a_study_refuses_slots_held_from_the_start(tmp_path):
  config = study_config()
  config.growth.slots = "schedule"
  with pytest.raises(config_lib.ConfigError, match="growth.slots='schedule'.*use 'events'"):
    replicate.run_study(config, str(tmp_path), seeds=1, jobs=1, variants=STUDY_VARIANTS,
                        post_event_steps=5)
  assert not os.listdir(tmp_path)


def test_sigterm_starts_no_new_run_and_passes_on_to_the_running_ones():
  """What stopping a study does: the running task gets SIGTERM (here it dies of it; a training
  run saves a checkpoint and stops), the waiting one never starts, and the handler before is
  back."""
  before = signal.getsignal(signal.SIGTERM)
  tasks = {("running", 0): (time.sleep, (120,)), ("waiting", 0): (time.sleep, (120,))}
  ended = []
  # The handler is in place from the first task's start on, well before this fires.
  threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
  for key, exit_code in replicate.in_processes(tasks, jobs=1):
    ended.append((key, exit_code))
  assert ended == [(("running", 0), -signal.SIGTERM)]
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_study_tells_a_failed_run_from_one_that_never_started(tmp_path):
  """run_all's outcomes, which replicate's last line counts: a run that failed, and one that a
  SIGTERM right after it kept from starting."""
  broken = study_config()
  broken.num_epochs = -1  # refused as training starts: the run fails
  configs = {("broken", s): (broken, str(tmp_path / f"seed{s}")) for s in range(2)}
  calls = []

  def derived(summaries):  # called before training, then as each run ends
    del summaries
    calls.append(None)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  summaries, ended = replicate.run_all(configs, jobs=1, derived=derived)
  assert summaries == {("broken", 0): None, ("broken", 1): None}
  assert ended == {("broken", 0): "failed"}
  assert "num_epochs" in (tmp_path / "seed0" / "train.log").read_text()


def test_a_task_made_ready_by_one_that_ended_runs_before_those_waiting():
  """in_processes' follow_up: what a task's end makes ready (a seed's compute-matched statics)
  starts before the tasks still waiting (the next seed's runs)."""
  tasks = {("grown", 0): (time.sleep, (0,)), ("grown", 1): (time.sleep, (0,))}
  follow = {("grown", 0): {("matched", 0): (time.sleep, (0,))}}
  order = [key for key, exit_code in replicate.in_processes(
      tasks, jobs=1, follow_up=lambda key, exit_code: follow.get(key, {}))]
  assert order == [("grown", 0), ("matched", 0), ("grown", 1)]


@pytest.fixture(scope="module")
def runs(study):
  """(a grown run, a static run) of the study."""
  return (replicate.run_dir(study, "splitting", 0), replicate.run_dir(study, "static_reduced", 0))


def test_study_pairs_the_variants_until_the_growth_event(study):
  """Same initial parameters and batches: every variant's loss is the same at every step up to
  the event (and the step after it: exact growth), and the rules' parameters at the event are
  the same; they then grow different neurons with their own kind of unit, and the report shows
  the paired comparison, the unit ablation and both figures."""
  dirs = {v: replicate.run_dir(study, v, 0) for v in ("splitting", "authors", "static_reduced")}
  (event_step,) = [e["step"] for e in _summary(dirs["splitting"])["growth_events"]]
  losses = {v: evidence.train_losses(d) for v, d in dirs.items()}
  assert set(range(1, event_step + 1)) <= set(losses["splitting"])
  # Exact growth keeps the function: the step after the event still sees equal losses.
  same = range(1, event_step + 2)
  for v in ("authors", "static_reduced"):
    assert [losses[v][s] for s in same] == [losses["splitting"][s] for s in same], v
  assert losses["authors"][event_step + 2] != losses["splitting"][event_step + 2]

  at_event = {v: read_checkpoint(dirs[v], event_step).variables for v in ("splitting", "authors")}
  base = {v: {k: x for k, x in traverse_util.flatten_dict(at_event[v]["params"], sep="/").items()
              if not layers.is_unit_param(k.rsplit("/", 1)[-1])} for v in at_event}
  assert base["splitting"].keys() == base["authors"].keys()
  for name, value in base["splitting"].items():
    np.testing.assert_array_equal(value, base["authors"][name], err_msg=name)
  neurons = {v: traverse_util.flatten_dict(at_event[v][GROWTH_COLLECTION], sep="/")
             for v in at_event}
  assert any(k not in neurons["authors"] or not np.array_equal(n, neurons["authors"][k])
             for k, n in neurons["splitting"].items())

  text = pathlib.Path(study, "replication.md").read_text()
  assert "| top1 | authors - splitting | 1 |" in text
  for figure in ("forest.png", "loss_around_events.png"):
    assert pathlib.Path(study, figure).read_bytes()[:8] == PNG_MAGIC


def test_study_pairs_the_split_and_noise_floor_variants_with_the_papers_text(study):
  """split and noise_floor train as splitting does up to the event and grow the same neurons.
  noise_floor then has every parameter off by about growth.perturbation of itself; split grows
  them in split mode, which changes its first loss after the event (taken on the probe batch,
  before an update) by what the event's split check measured on the probe for the same
  growth."""
  dirs = {v: replicate.run_dir(study, v, 0) for v in ("splitting", "split", "noise_floor")}
  events = {v: _summary(d)["growth_events"][0] for v, d in dirs.items()}
  event_step = events["splitting"]["step"]
  losses = {v: evidence.train_losses(d) for v, d in dirs.items()}
  at_event = {v: read_checkpoint(d, event_step).variables for v, d in dirs.items()}
  flat = {v: traverse_util.flatten_dict(at_event[v]["params"], sep="/") for v in dirs}
  for v in ("split", "noise_floor"):
    assert [losses[v][s] for s in range(1, event_step + 1)] == (
        [losses["splitting"][s] for s in range(1, event_step + 1)]), v
    assert events[v]["grown"] == events["splitting"]["grown"], v
    jax.tree.map(np.testing.assert_array_equal, at_event[v][GROWTH_COLLECTION],
                 at_event["splitting"][GROWTH_COLLECTION])

  assert events["noise_floor"]["perturbation"] == 1e-3 and "perturbation" not in events["splitting"]
  change = {k: flat["noise_floor"][k] - p for k, p in flat["splitting"].items()}
  relative = np.sqrt(sum(np.sum(c**2) for c in change.values())
                     / sum(np.sum(p**2) for p in flat["splitting"].values()))
  assert 0.9e-3 < relative < 1.1e-3, relative
  for k, p in flat["splitting"].items():  # entry by entry, zeros (a new unit's gain) kept
    assert np.all(np.abs(change[k]) <= 6e-3 * np.abs(p)), k

  first = event_step + 1
  check = events["splitting"]["split_check"]
  np.testing.assert_allclose(losses["split"][first] - losses["splitting"][first],
                             check["probe"] * events["splitting"]["plan_params"], atol=1e-5)
  assert losses["split"][first] != losses["splitting"][first]


def test_every_grown_variant_measures_unit_only_training_alike(study):
  """Each grown variant's event trained its new units alone for growth.unit_only_steps steps:
  the record's drop per parameter is its held-aside losses' difference over the parameters
  the event added. Exact growth keeps the function, so before that training the held-aside
  loss is the ungrown model's, the same for both exact rules (same base at the event); split
  mode and the perturbation change it. The report tabulates it and compares it paired."""
  events = {v: _summary(replicate.run_dir(study, v, 0))["growth_events"][0]
            for v in ("splitting", "split", "noise_floor", "authors")}
  for v, event in events.items():
    measured = event["unit_only"]
    assert measured["steps"] == 3 and np.isfinite(measured["loss_after"]), v
    added = event["params_after"] - event["params_before"]
    assert measured["drop_per_param"] == pytest.approx(
        (measured["loss_before"] - measured["loss_after"]) / added, rel=1e-12), v
  # A run that measures its events counts their work, and its summary sums it (compute.py).
  for v, event in events.items():
    work = event["work_flops"]
    assert work["spectrum"] > 0 and work["unit_only"] > 0, v
    compute = _summary(replicate.run_dir(study, v, 0))["compute"]
    assert compute["event_flops"] == sum(work[k] for k in ("spectrum", "split_check", "unit_only"))
  before = {v: e["unit_only"]["loss_before"] for v, e in events.items()}
  assert before["authors"] == pytest.approx(before["splitting"], rel=1e-5)
  assert before["split"] != pytest.approx(before["splitting"], rel=1e-5)
  assert before["noise_floor"] != before["splitting"]
  text = pathlib.Path(study, "replication.md").read_text()
  assert "## Unit-only training" in text
  assert "| unit_only/1 | authors - splitting | 1 |" in text


def test_the_unit_scale_sweep_names_every_gated_exact_variant_once_per_scale():
  variants = ["splitting", "split", "authors", "random", "static_reduced"]
  assert replicate.sweep_unit_scales(variants, [], 1.0) == variants
  assert replicate.sweep_unit_scales(variants, [0.1, 0.3, 1.0], 1.0) == [
      "splitting@0.1", "splitting@0.3", "splitting", "split", "authors", "random@0.1",
      "random@0.3", "random", "static_reduced"]


NAMES = ("splitting/seed0", "static_reduced/seed0")  # report.run_names of the two runs


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _table_row(text, first_cell):
  rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
  assert len(rows) == 1, f"expected one table row for {first_cell!r}"
  return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_report_tables_and_images_hold_the_runs_numbers(runs, tmp_path):
  out = tmp_path / "out" / "report.md"
  report.main(["--workdir", *runs, "--out", str(out)])
  text = out.read_text()
  grown, static = (_summary(w) for w in runs)

  assert "unit ablation (every unit switched off)" in text
  for name, s in zip(NAMES, (grown, static)):
    row = _table_row(text, name)
    assert row[2] == f"{s['eval']['top1']:.2%}" and row[3] == f"{s['eval']['top5']:.2%}"
    assert row[4] == f"{s['base_params']:,}" and row[5] == f"{s['params']:,}"
    assert row[7] == str(len(s["growth_events"]))
    assert row[8] == f"{s['wall_seconds'] / 60:.1f} min"
    # The study measures its events (unit-only training): the grown run counts their work.
    compute = s["compute"]
    assert (compute["event_flops"] > 0) == bool(s["growth_events"])
    assert row[9] == f"{compute['train_flops'] / 1e12:.4g} + {compute['event_flops'] / 1e12:.4g}"

  for name, s in zip(NAMES, (grown, static)):
    flops = report.forward_flops(s["architecture"], (8, 8, 1), tiny_config().model.patch_size)
    assert _table_row(text, name)[6] == f"{flops / 1e6:,.2f}"

  assert len(grown["growth_events"]) == 1 and not static["growth_events"]
  for event in grown["growth_events"]:
    row = _table_row(text, str(event["step"]))
    assert row[1:5] == [event["rule"], event["unit"], f"{event['params_before']:,}",
                        f"{event['params_after']:,}"]
  assert grown["params"] > grown["base_params"]

  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  expected = {f"{NAMES[0]}/plots/{n}" for n in [plots.TRAINING, plots.UNITS] + [
      plots.eigenvalues_name(e["step"]) for e in grown["growth_events"]]}
  expected.add(f"{NAMES[1]}/plots/{plots.TRAINING}")
  assert {"/".join(pathlib.Path(i).parts[-4:]) for i in images} == expected
  for image in images:
    with open(out.parent / image, "rb") as f:
      assert f.read(8) == PNG_MAGIC


def _grown_tiny_deit(events=2):
  problem = make_deit()
  variables = problem.variables
  for event in range(events):
    spectrum = random_spectrum(variables, seed=event)
    plan = grow.select(spectrum, budget=300, rule="random", max_layer_fraction=0.5,
                       rng=jax.random.key(event))
    variables = grow.grow(variables, plan, spectrum)
  return problem, variables


def _matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution in a jaxpr and its sub-jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * int(np.prod(out)) * int(np.prod(kernel)) // out_features
  return total + sum(_matmul_flops(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


def test_forward_flops_equals_the_jaxprs_matmul_count():
  problem, variables = _grown_tiny_deit()
  architecture = spec.from_variables(variables)
  assert spec.unit_params(architecture) > 0
  image = problem.batch[0][:1]
  jaxpr = jax.make_jaxpr(lambda v: problem.model.apply(v, image, train=False))(variables)
  # Each depth computes only its units (layers.py), not its pack's padded slots: the formula,
  # which counts the units the model has, is the jaxpr's count.
  assert sum(sum(layer["slots"].values()) for layer in architecture["layers"].values()) > (
      spec.num_units(architecture))
  assert report.forward_flops(architecture, image.shape[1:], problem.model.patch_size) == (
      _matmul_flops(jaxpr.jaxpr))


def test_units_per_neuron_counts_every_event_and_the_event_figures_are_drawn(tmp_path):
  workdir = str(tmp_path)
  variables = make_deit().variables
  expected = {}
  for step in (10, 20):
    spectrum = random_spectrum(variables, seed=step)
    plan = grow.select(spectrum, budget=300, rule="random", max_layer_fraction=0.5,
                       rng=jax.random.key(step))
    variables = grow.grow(variables, plan, spectrum)
    plots.growth_event_figures(workdir, step, spectrum, plan, variables)
    for path, neurons in plan.indices.items():
      np.add.at(expected.setdefault(path, np.zeros(spectrum[path].eigvals.shape[0], int)), neurons, 1)
  units = plots.units_per_neuron(variables)
  assert list(units) == sorted(units, key=plots.layer_order)
  for path, counts in units.items():
    np.testing.assert_array_equal(counts, expected.get(path, np.zeros_like(counts)))
  for name in (plots.eigenvalues_name(10), plots.units_name(20), plots.UNITS):
    with open(os.path.join(plots.plots_dir(workdir), name), "rb") as f:
      assert f.read(8) == PNG_MAGIC
