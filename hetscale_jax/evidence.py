"""Paired evidence from a replication's runs (hetscale_jax.replicate): per-run measures, paired
differences over seeds with 95% intervals, and the study report's tables and figures. Every
table of the study is built here; report.py holds the markdown primitives and the report of
single runs, replicate.py runs the study and writes what this module renders.

Every variant of one seed starts from the same initial parameters (where shapes allow), sees
the same batches and grows at the same steps, so the per-seed difference of a measure between
two variants removes what the seed alone decides. For n seeds, a difference's interval is the
t-interval mean +- t(0.975, n - 1) * std / sqrt(n) of the n paired differences; it "resolves"
the difference when it excludes 0.

Measures of one run:
  top1, top5, test_loss    final test top-1, top-5 (%) and test loss
  params, mflops           final parameters and forward MFLOPs per image
  wall_seconds             the run's wall time, compilation and growth events included
  steps                    training steps (fewer or more for a compute-matched static)
  train_tflops             training TFLOPs measured by XLA (summary["compute"], compute.py):
                           each architecture's train step times the steps it trained
  event_tflops             the growth events' own work (spectrum, split check, unit-only
                           training), counted apart from training
  post_event_loss/<i>      mean training loss of the K steps after growth event i, leaving out
                           the first: its loss is the grown model's before any update (for exact
                           growth the ungrown model's, for split mode the step itself)
  split_check/<i>          event i grown in split mode on a copy instead: the loss change on the
                           held-aside batches, per added parameter (growth_event.split_check)
  unit_only/<i>            event i's new units trained alone on a copy, base frozen
                           (unit_only.py): the drop in held-aside loss per added parameter
  units_off_top1,          the change in final test top-1 and loss when every unit is switched
  units_off_loss           off (ablation): what the grown units carry

Across variants, paired by seed:
  selection                a rule against its random counterpart (config_lib.random_counterpart:
                           the same unit, random neurons) in unit-only training and at the end
  compute-matched          a grown variant against static_full and static_uniform trained
                           on its training FLOPs ("static_uniform@flops:splitting",
                           config_lib.compute_matched_steps), next to static_uniform at its
                           parameters
  wall-matched             a grown variant against the static whose mean wall time is nearest
                           its own (wall_matched_pairs)
  units' share             of a grown variant's gain over static_reduced, the part its units
                           carry: mean(intact - units off) / mean(intact - static_reduced)
  advantage halving        a rule's advantage over its random counterpart (config_lib.
                           random_counterpart) after an event, the counterpart's training loss
                           minus the rule's over the K steps post_event_loss averages, mean over
                           seeds and smoothed: the step at which it has fallen to half its value
                           at insertion (halving_step)
"""

import os

from matplotlib.figure import Figure
import numpy as np
from scipy import stats

from hetscale_jax import config_lib, plots, report, writers

PER_MILLION = 1e6  # split-check and unit-only losses are reported per million added parameters
UNITS_OFF = {"top1": "units_off_top1", "test_loss": "units_off_loss"}  # measure -> its ablation


# ---------------------------------------------------------------------------- measures

def train_losses(workdir: str) -> dict[int, float]:
  """{step: training loss} of a run's metrics.jsonl."""
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir)["train"]}


def post_event_steps(event_step: int, k: int) -> range:
  """The k logged steps after a growth at `event_step` that the post-event measures read:
  event_step + 2 .. event_step + k + 1. Step event_step + 1 is left out: its loss is taken
  before the grown model's first update, so it shows the growth step, not training."""
  return range(event_step + 2, event_step + k + 2)


def post_event_loss(losses: dict[int, float], event_step: int, k: int) -> float:
  """Mean training loss of the post_event_steps; nan if any is missing."""
  window = [losses.get(s) for s in post_event_steps(event_step, k)]
  return float("nan") if None in window else float(np.mean(window))


def run_measures(summary: dict, losses: dict[int, float], event_steps: list[int], k: int,
                 flops: int | None) -> dict[str, float]:
  """The measures of one finished run (module docstring); `event_steps` are the study's
  growth steps, the same for every variant."""
  out = {"top1": 100 * summary["eval"]["top1"], "top5": 100 * summary["eval"]["top5"],
         "test_loss": summary["eval"]["loss"], "params": float(summary["params"]),
         "mflops": float("nan") if flops is None else flops / 1e6,
         "wall_seconds": summary["wall_seconds"], "steps": float(summary["steps"])}
  compute = summary.get("compute")  # absent from the runs of earlier versions
  for name in ("train", "event"):  # None: not measured (compute.run_compute)
    flops = (compute or {}).get(f"{name}_flops")
    out[f"{name}_tflops"] = float("nan") if flops is None else flops / 1e12
  if summary.get("unit_ablation"):  # None for a static run
    intact, off = summary["unit_ablation"]["intact"], summary["unit_ablation"]["units_off"]
    out["units_off_top1"] = 100 * (off["top1"] - intact["top1"])
    out["units_off_loss"] = off["loss"] - intact["loss"]
  for i, step in enumerate(event_steps, 1):
    out[f"post_event_loss/{i}"] = post_event_loss(losses, step, k)
  for i, event in enumerate(summary["growth_events"], 1):
    if "split_check" in event:
      check = event["split_check"]
      out[f"split_check/{i}"] = PER_MILLION * check["check"]
      out[f"split_probe/{i}"] = PER_MILLION * check["probe"]
      out[f"split_predicted/{i}"] = PER_MILLION * check["predicted"]
    if "unit_only" in event:
      out[f"unit_only/{i}"] = PER_MILLION * event["unit_only"]["drop_per_param"]
  return out


# ---------------------------------------------------------------------------- statistics

def t_interval(values) -> tuple[float, float, float]:
  """(mean, low, high): the 95% t-interval of the mean; nan bounds for fewer than 2 values."""
  values = np.asarray(values, np.float64)
  mean = float(np.mean(values)) if len(values) else float("nan")
  if len(values) < 2:
    return mean, float("nan"), float("nan")
  half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
  return mean, mean - half, mean + half


def excludes_zero(low: float, high: float) -> bool:
  return bool(np.isfinite(low) and (low > 0 or high < 0))


def paired_seeds(runs: dict, variant: str, reference: str) -> list[int]:
  """The seeds of which both variants ran; `runs` is keyed by (variant, seed)."""
  return sorted({s for v, s in runs if v == variant} & {s for v, s in runs if v == reference})


def paired_differences(measures: dict, variant: str, reference: str, name: str) -> list[float]:
  """measure `name` of `variant` minus that of `reference`, for every seed where both ran."""
  diffs = [measures[variant, s].get(name, np.nan) - measures[reference, s].get(name, np.nan)
           for s in paired_seeds(measures, variant, reference)]
  return [d for d in diffs if np.isfinite(d)]


def comparisons(measures: dict, pairs, names) -> list[dict]:
  """One row per (variant, reference) pair and measure name: the paired mean difference and
  its interval."""
  rows = []
  for name in names:
    for variant, reference in pairs:
      diffs = paired_differences(measures, variant, reference, name)
      if diffs:
        mean, low, high = t_interval(diffs)
        rows.append({"measure": name, "variant": variant, "reference": reference, "n": len(diffs),
                     "mean": mean, "low": low, "high": high, "resolved": excludes_zero(low, high)})
  return rows


def units_share(measures: dict, variant: str, reference: str, name: str) -> dict | None:
  """The share of `variant`'s gain in measure `name` (top1 or test_loss) over `reference` that
  its units carry, paired by seed: the mean of intact - units off over the mean of variant -
  reference, each with its interval (nan without a gain). A ratio of means: a per-seed ratio
  would be swamped by the seeds that gained almost nothing. None if no seed has both."""
  pairs = [(-measures[variant, s].get(UNITS_OFF[name], np.nan),
            measures[variant, s][name] - measures[reference, s][name])
           for s in paired_seeds(measures, variant, reference)]
  pairs = np.array([p for p in pairs if np.all(np.isfinite(p))]).reshape(-1, 2)
  if not len(pairs):
    return None
  carried, gain = t_interval(pairs[:, 0]), t_interval(pairs[:, 1])
  return {"measure": name, "variant": variant, "reference": reference, "n": len(pairs),
          "carried": carried, "gain": gain,
          "share": carried[0] / gain[0] if gain[0] else float("nan")}


def advantage_after(losses: dict, variant: str, reference: str, event_step: int,
                    k: int) -> np.ndarray:
  """[seeds, k]: for each seed of which both ran (losses: {(variant, seed): {step: loss}}),
  the reference's training loss minus the variant's at the post_event_steps: the variant's
  advantage, > 0 where its loss is lower. A seed missing one of those steps is left out."""
  steps = post_event_steps(event_step, k)
  rows = [[losses[reference, s][t] - losses[variant, s][t] for t in steps]
          for s in paired_seeds(losses, variant, reference)
          if all(t in losses[variant, s] and t in losses[reference, s] for t in steps)]
  return np.array(rows, np.float64).reshape(-1, k)


def halving_step(advantage, window: int) -> int | None:
  """The step at which an advantage has fallen to half its value at insertion.

  `advantage[i]` is its value i steps after the first step counted; smoothed, each step's
  value is the mean over the `window` steps from it (batch-to-batch noise averages out), and
  the value at insertion is the first window's. Returns the first i whose smoothed value is
  at most half of that; None if none is within the curve, or if there is no positive
  advantage at insertion to halve.
  """
  smoothed = np.convolve(np.asarray(advantage, np.float64), np.ones(window) / window, "valid")
  if not len(smoothed) or not smoothed[0] > 0:
    return None
  halved = np.flatnonzero(smoothed <= smoothed[0] / 2)
  return int(halved[0]) if len(halved) else None


# ---------------------------------------------------------------------------- tables

def mean_spread(values, spread: str) -> str:
  """"mean ± spread" over seeds: spread "std", the sample std (how much one seed moves a run),
  or "ci", the 95% t half-width (how well the seeds pin the mean); the value alone for one
  seed, "n/a" for none."""
  values = [v for v in values if np.isfinite(v)]
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.4g}"
  mean, low, high = t_interval(values)
  half = np.std(values, ddof=1) if spread == "std" else (high - low) / 2
  return f"{mean:.4g} ± {half:.2g}"


def _mean(values, form: str) -> str:
  values = [v for v in values if np.isfinite(v)]
  return form.format(np.mean(values)) if values else "n/a"


def _runs_of(measures: dict, variant: str) -> list[dict]:
  return [m for (v, _), m in measures.items() if v == variant]


def final_table(measures: dict, variants, seeds: int) -> list[str]:
  """Per variant: finished runs of `seeds`, final test metrics (mean ± sample std), final
  parameters (their range), MFLOPs per image, and per run (means) training steps, training
  and growth events' TFLOPs and wall time."""
  rows = []
  for variant in variants:
    runs = _runs_of(measures, variant)
    params = sorted({int(m["params"]) for m in runs})
    column = lambda name: [m[name] for m in runs]
    rows.append([variant, f"{len(runs)}/{seeds}", mean_spread(column("top1"), "std"),
                 mean_spread(column("top5"), "std"), mean_spread(column("test_loss"), "std"),
                 "n/a" if not params else f"{params[0]:,}" if len(params) == 1
                 else f"{params[0]:,}–{params[-1]:,}",
                 _mean(column("mflops"), "{:.2f}"), _mean(column("steps"), "{:.0f}"),
                 _mean(column("train_tflops"), "{:.4g}"), _mean(column("event_tflops"), "{:.4g}"),
                 _mean(column("wall_seconds"), "{:.0f}")])
  return report.markdown_table(["variant", "runs", "top-1 %", "top-5 %", "test loss",
                                "params (final)", "MFLOPs/image", "steps", "train TFLOPs/run",
                                "event TFLOPs/run", "wall s/run"], rows)


def summary_table(measures: dict, variants, names) -> list[str]:
  """Per variant and measure: mean ± 95% half-width over seeds."""
  rows = [[variant, str(len(_runs_of(measures, variant)))]
          + [mean_spread([m.get(name, np.nan) for m in _runs_of(measures, variant)], "ci")
             for name in names] for variant in variants]
  return report.markdown_table(["variant", "runs"] + list(names), rows)


def _interval(mean: float, low: float, high: float) -> str:
  return f"{mean:+.4g} [{low:+.4g}, {high:+.4g}]"


def comparison_table(rows: list[dict]) -> list[str]:
  return report.markdown_table(
      ["measure", "variant - reference", "seeds", "mean difference", "95% interval", "resolved"],
      [[r["measure"], f"{r['variant']} - {r['reference']}", str(r["n"]), f"{r['mean']:+.4g}",
        f"[{r['low']:+.4g}, {r['high']:+.4g}]", "yes" if r["resolved"] else "no"] for r in rows])


def units_share_table(rows: list[dict]) -> list[str]:
  return report.markdown_table(
      ["measure", "variant", "seeds", "carried: intact - units off [95%]",
       "gain: intact - reference [95%]", "share carried", "gain resolved"],
      [[r["measure"], f"{r['variant']} (reference {r['reference']})", str(r["n"]),
        _interval(*r["carried"]), _interval(*r["gain"]), f"{r['share']:.2f}",
        "yes" if excludes_zero(*r["gain"][1:]) else "no"] for r in rows])


def halving_table(losses: dict, pairs, event_steps: list[int], k: int, window: int) -> list[str]:
  """Per (rule, random counterpart) pair and event: the rule's advantage at insertion (the
  first smoothing window's mean, per seed) and halving_step of the mean over seeds."""
  rows = []
  for variant, reference in pairs:
    for i, event_step in enumerate(event_steps, 1):
      advantage = advantage_after(losses, variant, reference, event_step, k)
      if not len(advantage):
        continue
      halved = halving_step(advantage.mean(axis=0), window)
      at_insertion = t_interval(advantage[:, :window].mean(axis=1))
      rows.append([f"{variant} - {reference}", str(i), str(len(advantage)),
                   _interval(*at_insertion),
                   "no advantage" if not at_insertion[0] > 0 else
                   f"never within {k}" if halved is None else str(halved)])
  return report.markdown_table(["rule vs random counterpart", "event", "seeds",
                                "advantage at insertion [95%]", "steps to halve"], rows)


# ---------------------------------------------------------------------------- the report

def compute_matched_pairs(grown, variants) -> list[tuple[str, str]]:
  """(grown variant, a static trained on its FLOPs) for every such static among `variants`."""
  return [(v, config_lib.flops_matched(s, v)) for v in grown
          for s in config_lib.COMPUTE_MATCHED_STATICS if config_lib.flops_matched(s, v) in variants]


def wall_matched_pairs(measures: dict, grown, variants) -> list[tuple[str, str]]:
  """(grown variant, the static among `variants` whose mean wall time is nearest its own). The
  wall is the machine's, so this pairing is found in the runs, not designed into the study."""
  mean_wall = {v: np.mean([m["wall_seconds"] for m in runs]) for v in variants
               if (runs := _runs_of(measures, v))}
  statics = [v for v in mean_wall if not config_lib.is_grown(v)]
  return [(v, min(statics, key=lambda s: abs(mean_wall[s] - mean_wall[v])))
          for v in grown if v in mean_wall and statics]


def study_report(measures: dict, losses: dict, variants, seeds: int, event_steps: list[int],
                 k: int, workdir: str) -> list[str]:
  """The study's sections (markdown lines) from every finished run's measures and training
  losses, both keyed by (variant, seed); draws its two figures into workdir."""
  events = range(1, len(event_steps) + 1)
  per_event = lambda *names: [f"{n}/{i}" for n in names for i in events]
  grown = [v for v in variants if config_lib.is_grown(v)]
  lines = ["## Final results (mean ± sample std over seeds)", ""]
  lines += final_table(measures, variants, seeds)
  lines += ["", "Train TFLOPs: XLA's count of each architecture's compiled train step times "
            "the steps it trained; event TFLOPs: the growth events' own work, of which XLA "
            "counts each loop's body once (the Lanczos solve: one iteration; compute.py). Wall: "
            "the training loop, growth events and their recompiles included."]
  lines += ["", "## Training loss after each growth event (mean ± 95% half-width over seeds)",
            "", f"post_event_loss/i: the mean training loss of the {k} steps after event i, "
            "leaving out the first (taken before the grown model's first update).", ""]
  lines += summary_table(measures, variants, per_event("post_event_loss"))
  if grown:
    lines += ["", "## What the units carry: change when every unit is switched off (mean ± 95% "
              "half-width)", ""]
    lines += summary_table(measures, grown, ["units_off_top1", "units_off_loss"])
  shares = [units_share(measures, v, "static_reduced", name) for name in UNITS_OFF for v in grown]
  if any(shares):
    lines += ["", "## The units' share of the gain over static_reduced (paired by seed)", "",
              "(intact - units off) / (intact - static_reduced): the mean of each over the "
              "seeds, then their ratio; it means little where the gain is not resolved.", ""]
    lines += units_share_table([r for r in shares if r])
  if grown:
    lines += ["", "## The criterion: growth events in split mode, loss change per million added "
              "parameters", "",
              "The chosen neurons grown as gated units in split mode at growth.split_check_scale "
              "eps, each gain downhill. split_predicted: the second-order prediction, the sum of "
              "-1/2 eps^2 |r^T S r| over the chosen units (on the probe); split_probe: measured on "
              "the probe; split_check: measured on the held-aside batches (the first "
              "growth.held_aside_batches test batches).", ""]
    lines += summary_table(measures, grown, per_event("split_predicted", "split_probe",
                                                      "split_check"))
  if any(name in m for m in measures.values() for name in per_event("unit_only")):
    lines += ["", "## Unit-only training: what each event's new units learn alone (held-aside "
              "loss drop per million added parameters)", "",
              "On a copy at each event, the event's new units alone train for "
              "growth.unit_only_steps Adam steps at the run's peak learning rate on the "
              "training batches that follow, the rest of the model frozen; the drop in loss on "
              "the held-aside batches (the first test batches), mean ± 95% half-width.", ""]
    lines += summary_table(measures, grown, per_event("unit_only"))
  counterparts = [(v, config_lib.random_counterpart(v)) for v in grown]
  counterparts = [(v, r) for v, r in counterparts if r in variants]
  to_splitting = [(v, config_lib.at_scale_of(v, "splitting")) for v in grown + ["static_reduced"]]
  rows = comparisons(measures, [(v, r) for v, r in to_splitting if v != r and r in variants],
                     ["top1", "test_loss"] + per_event("post_event_loss", "split_check", "unit_only"))
  # splitting's counterpart is random, already above as random - splitting.
  rows += comparisons(measures, [(v, r) for v, r in counterparts
                                 if v != config_lib.at_scale_of(v, "splitting")],
                      ["top1", "test_loss"] + per_event("unit_only"))
  conventional = [(v, "static_uniform") for v in grown if "static_uniform" in variants]
  if {"static_full", "static_reduced"} <= set(variants):
    conventional.append(("static_full", "static_reduced"))
  rows += comparisons(measures, conventional, ["top1", "test_loss"])
  flops_matched = compute_matched_pairs(grown, variants)
  rows += comparisons(measures, flops_matched, ["top1", "test_loss", "train_tflops"])
  wall_matched = wall_matched_pairs(measures, grown, variants)
  rows += comparisons(measures, [p for p in wall_matched if p not in conventional + flops_matched],
                      ["top1", "test_loss"])
  rows += comparisons(measures, wall_matched, ["wall_seconds"])
  lines += ["", "## Paired differences (variant - reference, same seed; 95% t-interval)", "",
            "Each grown variant against the paper's text at its unit scale, then each rule "
            "against random neurons with the same unit (selection). noise_floor - "
            "splitting is the same run perturbed by growth.perturbation right after the first "
            "event: a difference within its interval is below what the study resolves. "
            "Then each grown variant against static_uniform at its parameters, and against "
            "static_full and static_uniform trained on its training FLOPs, seed by seed "
            "(\"static_uniform@flops:splitting\": fewer or more steps, the learning-rate "
            "schedule compressed to them; train_tflops shows how closely they match). Last, "
            "each grown variant against the static whose mean wall time on this machine is "
            "nearest its own (wall_seconds shows how near).", ""]
  lines += comparison_table(rows)
  window = max(k // 5, 1)
  if counterparts and event_steps:
    lines += ["", "## How long a rule's advantage over random neurons lasts", "",
              f"The random counterpart's training loss minus the rule's over the {k} steps "
              "after each event that post_event_loss averages, mean over seeds, smoothed by "
              f"the mean over the {window} steps from each: its value at insertion (the first "
              "window; interval over seeds), and the steps from the first counted one until "
              "it has fallen to half of that.", ""]
    lines += halving_table(losses, counterparts, event_steps, k, window)
  if rows:
    plots.save(forest_figure(rows), os.path.join(workdir, "forest.png"))
  curves = {v: runs for v in grown + ["static_reduced"] if v in variants
            and (runs := [run for (name, _), run in losses.items() if name == v])}
  if event_steps and curves:
    plots.save(loss_around_events_figure(curves, event_steps, before=k, after=2 * k),
               os.path.join(workdir, "loss_around_events.png"))
  lines += ["", "![training loss around the growth events](loss_around_events.png)", "",
            "![paired differences](forest.png)"]
  return lines


# ---------------------------------------------------------------------------- figures

def loss_around_events_figure(curves: dict, event_steps: list[int], before: int,
                              after: int) -> Figure:
  """Training loss from `before` steps ahead of each growth event to `after` steps past it:
  one panel per event, one line per variant (mean over seeds, band: +-1 std over seeds).
  `curves` is {variant: [{step: loss} of each seed]}."""
  fig = Figure(figsize=(5.5 * len(event_steps), 3.6))
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.88, wspace=0.25)
  axes = np.atleast_1d(fig.subplots(1, len(event_steps)))
  for i, (ax, event) in enumerate(zip(axes, event_steps), 1):
    offsets = np.arange(-before, after + 1)
    for variant, runs in curves.items():
      table = np.array([[run.get(event + o, np.nan) for o in offsets] for run in runs])
      mean, std = np.nanmean(table, axis=0), np.nanstd(table, axis=0)
      line, = ax.plot(offsets, mean, lw=1.2, label=variant)
      ax.fill_between(offsets, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.axvline(0, color="gray", ls="--", lw=0.8)
    ax.set(title=f"growth event {i} (step {event})", xlabel="steps from the event",
           ylabel="training loss")
  axes[0].legend(fontsize=8)
  return fig


def forest_figure(rows: list[dict]) -> Figure:
  """Paired differences with their 95% intervals, one panel per measure; red where the
  interval excludes 0."""
  names = list(dict.fromkeys(r["measure"] for r in rows))
  heights = [max(sum(r["measure"] == n for r in rows), 1) for n in names]
  fig = Figure(figsize=(7, 0.45 * sum(heights) + 0.9 * len(names)))
  axes = np.atleast_1d(fig.subplots(len(names), 1, gridspec_kw={"height_ratios": heights}))
  fig.subplots_adjust(left=0.36, right=0.97, top=0.97, bottom=0.05, hspace=0.8)
  for ax, name in zip(axes, names):
    mine = [r for r in rows if r["measure"] == name][::-1]
    y = np.arange(len(mine))
    means = np.array([r["mean"] for r in mine])
    errors = np.array([[r["mean"] - r["low"], r["high"] - r["mean"]] for r in mine]).T
    for resolved, color in ((False, "tab:blue"), (True, "tab:red")):
      rows_in = np.array([r["resolved"] == resolved for r in mine])
      if rows_in.any():
        ax.errorbar(means[rows_in], y[rows_in], xerr=np.nan_to_num(errors[:, rows_in]),
                    fmt="o", ms=4, color=color, capsize=3,
                    label="interval excludes 0" if resolved else "interval includes 0")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(y, [f"{r['variant']} - {r['reference']}" for r in mine], fontsize=8)
    ax.set_title(name, fontsize=9)
  return fig
