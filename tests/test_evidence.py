"""evidence: per-run measures, paired differences and their t-intervals, the study's figures."""

import math

import numpy as np
import pytest

from hetscale_jax import evidence, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_DF4 = 2.7764451051977987  # Student t quantile 0.975 with 4 degrees of freedom (tables)


def test_t_interval_against_the_closed_form():
  values = [1.0, 2.0, 3.0, 4.0, 5.0]
  mean, low, high = evidence.t_interval(values)
  half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # sample variance of 1..5 is 2.5
  assert mean == 3.0
  np.testing.assert_allclose([low, high], [3.0 - half, 3.0 + half], rtol=1e-12)
  mean, low, high = evidence.t_interval([0.7])
  assert mean == 0.7 and math.isnan(low) and math.isnan(high)


def test_post_event_loss_is_the_mean_of_the_k_steps_after_the_event():
  losses = {s: float(s) for s in range(1, 21)}
  assert evidence.post_event_loss(losses, event_step=10, k=4) == np.mean([11, 12, 13, 14])
  assert math.isnan(evidence.post_event_loss(losses, event_step=18, k=4))  # step 21 missing


def test_paired_differences_pair_by_seed_and_skip_missing_runs():
  measures = {("a", 0): {"x": 5.0}, ("a", 1): {"x": 7.0}, ("a", 2): {"x": 1.0},
              ("b", 0): {"x": 4.0}, ("b", 1): {"x": np.nan}, ("b", 3): {"x": 0.0}}
  assert evidence.paired_differences(measures, "a", "b", "x") == [1.0]  # seed 0 only


def test_comparisons_resolve_only_intervals_that_exclude_zero():
  seeds = range(5)
  measures = {}
  for s in seeds:
    measures["ref", s] = {"x": 10.0 + s, "y": 3.0}
    measures["better", s] = {"x": 12.0 + s + 0.1 * (-1) ** s, "y": 3.0 + (s - 2)}
  rows = evidence.comparisons(measures, [("better", "ref")], ["x", "y"])
  by_measure = {r["measure"]: r for r in rows}
  x, y = by_measure["x"], by_measure["y"]
  assert x["n"] == 5 and x["resolved"] and x["low"] > 0
  np.testing.assert_allclose(x["mean"], np.mean([2.0 + 0.1 * (-1) ** s for s in seeds]))
  assert y["mean"] == 0.0 and not y["resolved"]  # differences -2..2: the interval holds 0
  table = "\n".join(evidence.comparison_table(rows))
  assert "| x | better - ref | 5 |" in table and table.count("| yes |") == 1


def test_run_measures_reads_a_summary():
  summary = {"eval": {"top1": 0.875, "loss": 0.4}, "params": 1234,
             "growth_events": [{"split_check": {"predicted": -2e-6, "probe": -1e-6,
                                                "check": 5e-7}}, {}]}
  losses = {s: 1.0 for s in range(1, 40)}
  out = evidence.run_measures(summary, losses, event_steps=[10, 30], k=5, flops=3_000_000)
  assert out["top1"] == 87.5 and out["test_loss"] == 0.4 and out["params"] == 1234
  assert out["mflops"] == 3.0
  assert out["post_event_loss/1"] == 1.0 and out["post_event_loss/2"] == 1.0
  np.testing.assert_allclose([out["split_predicted/1"], out["split_probe/1"],
                              out["split_check/1"]], [-2.0, -1.0, 0.5])
  assert "split_check/2" not in out


@pytest.mark.parametrize("figure", ["forest", "loss_around_events"])
def test_figures_are_drawn(figure, tmp_path):
  if figure == "forest":
    rows = [{"measure": "top1", "variant": v, "reference": "splitting", "n": 3, "mean": m,
             "low": m - 1, "high": m + h, "resolved": m - 1 > 0}
            for v, m, h in (("random", 0.5, 1.0), ("uniform", 2.0, 1.0),
                            ("first_order", 1.0, float("nan")))]
    fig = evidence.forest_figure(rows)
  else:
    curves = {v: [{s: 1.0 / s + 0.01 * seed for s in range(1, 60)} for seed in range(3)]
              for v in ("splitting", "random")}
    fig = evidence.loss_around_events_figure(curves, [20, 40], before=5, after=10)
  path = tmp_path / f"{figure}.png"
  plots.save(fig, str(path))
  assert path.read_bytes()[:8] == PNG_MAGIC
