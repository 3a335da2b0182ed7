"""evidence: per-run measures, paired differences and their t-intervals, the study's figures."""

import math

import numpy as np
import pytest

from hetscale_jax import config_lib, evidence, plots

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


def test_post_event_loss_is_the_mean_of_the_k_steps_after_the_first_after_the_event():
  losses = {s: float(s) for s in range(1, 21)}
  # Step 11's loss is the grown model's before its first update: left out.
  assert evidence.post_event_loss(losses, event_step=10, k=4) == np.mean([12, 13, 14, 15])
  assert math.isnan(evidence.post_event_loss(losses, event_step=16, k=4))  # step 21 missing


def test_halving_step_of_a_noisy_exponential_decay():
  """An advantage 3 exp(-t ln 2 / 9.5) halves between t = 9 and t = 10, under an oscillation
  of period 5 and amplitude 2 that crosses half at t = 3 unsmoothed; the mean over windows of
  5 steps removes the oscillation and keeps the decay's rate, so the answer is 10."""
  t = np.arange(50)
  advantage = 3.0 * np.exp(-t * np.log(2) / 9.5) + 2.0 * np.sin(2 * np.pi * t / 5)
  assert evidence.halving_step(advantage, window=5) == 10
  assert evidence.halving_step(advantage, window=1) == 3  # unsmoothed: the oscillation
  assert evidence.halving_step(advantage[:14], window=5) is None  # windows up to t = 9 only
  assert evidence.halving_step(np.full(20, 0.1), window=5) is None  # never halves
  assert evidence.halving_step(-advantage, window=5) is None  # no advantage to halve


def test_advantage_after_an_event_is_paired_by_seed_over_the_post_event_steps():
  rule = {s: 1.0 for s in range(1, 30)}
  losses = {("rule", 0): rule, ("rule", 1): rule, ("random", 0): {s: 1.0 + s for s in rule},
            ("random", 2): rule}
  advantage = evidence.advantage_after(losses, "rule", "random", event_step=10, k=3)
  np.testing.assert_array_equal(advantage, [[12.0, 13.0, 14.0]])  # seed 0: steps 12..14


def test_units_share_is_the_ratio_of_the_paired_means():
  measures = {}
  for s in range(4):
    measures["static_reduced", s] = {"top1": 90.0 + s, "test_loss": 0.5}
    # Gains of 2 +- 1 points, of which the units carry 1 +- 0.5 (their ablation loses it).
    measures["grown", s] = {"top1": 92.0 + s + (-1) ** s, "test_loss": 0.4,
                            "units_off_top1": -1.0 - 0.5 * (-1) ** s, "units_off_loss": 0.05}
  top1 = evidence.units_share(measures, "grown", "static_reduced", "top1")
  loss = evidence.units_share(measures, "grown", "static_reduced", "test_loss")
  assert top1["n"] == 4 and top1["carried"][0] == 1.0 and top1["gain"][0] == 2.0
  assert top1["share"] == 0.5
  np.testing.assert_allclose(loss["share"], (0.4 - 0.45) / (0.4 - 0.5))
  assert evidence.units_share(measures, "grown", "absent", "top1") is None


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
  summary = {"eval": {"top1": 0.875, "top5": 1.0, "loss": 0.4}, "params": 1234,
             "wall_seconds": 12.5, "steps": 40,
             "compute": {"train_flops": 2.5e12, "event_flops": 1e11},
             "growth_events": [{"split_check": {"predicted": -2e-6, "probe": -1e-6,
                                                "check": 5e-7}}, {}]}
  losses = {s: 1.0 for s in range(1, 40)}
  out = evidence.run_measures(summary, losses, event_steps=[10, 30], k=5, flops=3_000_000)
  assert out["top1"] == 87.5 and out["test_loss"] == 0.4 and out["params"] == 1234
  assert out["mflops"] == 3.0 and out["top5"] == 100.0 and out["wall_seconds"] == 12.5
  assert out["steps"] == 40 and out["train_tflops"] == 2.5 and out["event_tflops"] == 0.1
  del summary["compute"]  # a run of an earlier version: its compute is not known
  assert math.isnan(evidence.run_measures(summary, losses, [10, 30], 5, None)["train_tflops"])
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


def test_study_report_pairs_each_variant_with_its_references(tmp_path):
  """From synthetic runs: each grown variant against splitting at its own unit scale, the
  rules against random neurons at the same scale, the units' share against static_reduced."""
  variants = ["splitting", "splitting@0.3", "split", "noise_floor", "random", "random@0.3",
              "static_reduced"]
  event_steps, k = [25], 20
  measures, losses = {}, {}
  for variant in variants:
    for seed in range(3):
      # The rules' loss falls below random's by 0.1 just after the event, then the gap decays.
      gap = 0.0 if variant.startswith("random") or variant == "static_reduced" else 0.1
      losses[variant, seed] = {s: 1.0 + 0.01 * seed - gap * np.exp(-max(s - 27, 0) / 5.0)
                               * (s > 25) for s in range(1, 70)}
      measures[variant, seed] = evidence.run_measures(
          {"eval": {"top1": 0.9, "top5": 1.0, "loss": 0.3}, "params": 100,
           "wall_seconds": 1.0, "steps": 88, "growth_events": [],
           "unit_ablation": None if variant == "static_reduced" else
           {"intact": {"top1": 0.9, "loss": 0.3}, "units_off": {"top1": 0.89, "loss": 0.31}}},
          losses[variant, seed], event_steps, k, flops=None)
  text = "\n".join(evidence.study_report(measures, losses, variants, 3, event_steps, k,
                                         str(tmp_path)))
  for pair in ("random@0.3 - splitting@0.3", "split - splitting", "noise_floor - splitting",
               "random - splitting", "static_reduced - splitting"):
    assert f"| top1 | {pair} | 3 |" in text, pair
  for pair in ("splitting@0.3 - splitting", "random@0.3 - splitting", "split - random"):
    assert f"| {pair} |" not in text, pair
  # The gap is 0.1 exp(-t / 5) at the t-th counted step: in windows of k / 5 = 4 steps it
  # has halved where exp(-t / 5) <= 1/2, t >= 5 ln 2 = 3.5, so at t = 4.
  for pair in ("splitting - random", "splitting@0.3 - random@0.3"):
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {pair} | 1 | 3 |")]
    assert row.endswith("| 4 |"), row
  assert "| noise_floor - random |" not in text  # no random variant is perturbed
  assert "| top1 | splitting (reference static_reduced) | 3 |" in text
  assert (tmp_path / "forest.png").read_bytes()[:8] == PNG_MAGIC


def test_the_report_pairs_grown_variants_with_the_statics_trained_on_their_flops(tmp_path):
  """Every grown variant against static_uniform at its parameters and against both statics
  trained on its FLOPs, paired by seed; the final table shows each run's steps and TFLOPs."""
  matched = {s: config_lib.flops_matched(s, "splitting") for s in ("static_full", "static_uniform")}
  measures = {}
  for seed in range(3):
    common = {"params": 100.0, "mflops": 1.0, "wall_seconds": 10.0, "event_tflops": 0.0,
              "test_loss": 0.5, "top5": 100.0}
    measures["splitting", seed] = {**common, "top1": 90.0 + seed, "steps": 88.0,
                                   "train_tflops": 2.0, "event_tflops": 0.1}
    measures["static_uniform", seed] = {**common, "top1": 89.0 + seed, "steps": 88.0,
                                        "train_tflops": 2.2}
    measures["static_full", seed] = {**common, "top1": 91.0 + seed, "steps": 88.0,
                                     "train_tflops": 4.4}
    measures[matched["static_uniform"], seed] = {**common, "top1": 88.0 + seed, "steps": 80.0,
                                                 "train_tflops": 2.0 - 0.01 * seed}
    measures[matched["static_full"], seed] = {**common, "top1": 87.0 + seed, "steps": 40.0,
                                              "train_tflops": 2.0 - 0.02 * seed}
  variants = ["splitting", "static_full", "static_uniform", *matched.values()]
  text = "\n".join(evidence.study_report(measures, {}, variants, 3, [], 5, str(tmp_path)))
  for static, top1 in (("static_uniform", 2.0), ("static_full", 3.0)):
    assert f"| top1 | splitting - {matched[static]} | 3 | {top1:+.4g} |" in text
  assert "| top1 | splitting - static_uniform | 3 | +1 |" in text
  assert f"| train_tflops | splitting - {matched['static_full']} | 3 | +0.02 |" in text
  assert (f"| {matched['static_full']} | 3/3 | 88 ± 1 | 100 ± 0 | 0.5 ± 0 | 100 | 1.00 | 40 | 1.98 "
          "| 0 | 10 |") in text


def test_the_report_pairs_each_grown_variant_with_the_static_nearest_its_wall_time(tmp_path):
  """authors (mean wall 100 s) pairs with static_full (mean 90 s, not static_uniform's 40 s)
  and splitting (mean 50 s) with static_uniform; each pair's wall difference is reported, and a
  pair the report already compares at equal parameters is not compared twice."""
  walls = {"splitting": 50.0, "authors": 100.0, "static_uniform": 40.0, "static_full": 90.0}
  common = {"params": 100.0, "mflops": 1.0, "steps": 88.0, "train_tflops": 1.0,
            "event_tflops": 0.0, "test_loss": 0.5, "top5": 100.0}
  measures = {(variant, seed): {**common, "top1": top1 + seed, "wall_seconds": wall + seed}
              for seed in range(3)
              for (variant, wall), top1 in zip(walls.items(), (90.0, 91.0, 89.0, 95.0))}
  assert evidence.wall_matched_pairs(measures, ["splitting", "authors"], list(walls)) == [
      ("splitting", "static_uniform"), ("authors", "static_full")]
  text = "\n".join(evidence.study_report(measures, {}, list(walls), 3, [], 5, str(tmp_path)))
  assert "| top1 | authors - static_full | 3 | -4 |" in text
  assert "| wall_seconds | authors - static_full | 3 | +10 |" in text
  assert "| wall_seconds | splitting - static_uniform | 3 | +10 |" in text
  assert text.count("| top1 | splitting - static_uniform |") == 1
