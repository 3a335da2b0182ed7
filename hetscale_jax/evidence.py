"""Paired evidence from a replication's runs (hetscale_jax.replicate): per-run measures, paired
differences over seeds with 95% intervals, and the study's tables and figures.

Every variant of one seed starts from the same initial parameters (where shapes allow), sees
the same batches and grows at the same steps, so the per-seed difference of a measure between
two variants removes what the seed alone decides. For n seeds, a difference's interval is the
t-interval mean +- t(0.975, n - 1) * std / sqrt(n) of the n paired differences; it "resolves"
the difference when it excludes 0.

Measures of one run:
  top1, test_loss          final test top-1 (%) and test loss
  params, mflops           final parameters and forward MFLOPs per image
  post_event_loss/<i>      mean training loss of the K steps after growth event i (exact mode)
  split_check/<i>          event i grown in split mode on a copy instead: the loss change on the
                           held-aside check batch, per added parameter (growth_event.split_check)
  units_off_top1,          the change in final test top-1 and loss when every unit is switched
  units_off_loss           off (ablation): what the grown units carry
"""

from matplotlib.figure import Figure
import numpy as np
from scipy import stats

from hetscale_jax import report, writers

SPLIT_CHECK_SCALE = 1e6  # split-check losses are reported per million added parameters


# ---------------------------------------------------------------------------- measures

def train_losses(workdir: str) -> dict[int, float]:
  """{step: training loss} of a run's metrics.jsonl."""
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir)["train"]}


def post_event_loss(losses: dict[int, float], event_step: int, k: int) -> float:
  """Mean training loss of the k steps after a growth at `event_step` (logged as steps
  event_step + 1 .. event_step + k); nan if any is missing."""
  window = [losses.get(s) for s in range(event_step + 1, event_step + k + 1)]
  return float("nan") if None in window else float(np.mean(window))


def run_measures(summary: dict, losses: dict[int, float], event_steps: list[int], k: int,
                 flops: int | None) -> dict[str, float]:
  """The measures of one finished run (module docstring); `event_steps` are the study's
  growth steps, the same for every variant."""
  out = {"top1": 100 * summary["eval"]["top1"], "test_loss": summary["eval"]["loss"],
         "params": float(summary["params"]),
         "mflops": float("nan") if flops is None else flops / 1e6}
  if summary.get("unit_ablation"):  # None for a static run
    intact, off = summary["unit_ablation"]["intact"], summary["unit_ablation"]["units_off"]
    out["units_off_top1"] = 100 * (off["top1"] - intact["top1"])
    out["units_off_loss"] = off["loss"] - intact["loss"]
  for i, step in enumerate(event_steps, 1):
    out[f"post_event_loss/{i}"] = post_event_loss(losses, step, k)
  for i, event in enumerate(summary["growth_events"], 1):
    if "split_check" in event:
      check = event["split_check"]
      out[f"split_check/{i}"] = SPLIT_CHECK_SCALE * check["check"]
      out[f"split_probe/{i}"] = SPLIT_CHECK_SCALE * check["probe"]
      out[f"split_predicted/{i}"] = SPLIT_CHECK_SCALE * check["predicted"]
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


def paired_differences(measures: dict, variant: str, reference: str, name: str) -> list[float]:
  """measure `name` of `variant` minus that of `reference`, for every seed where both ran."""
  seeds = sorted({s for v, s in measures if v == variant} & {s for v, s in measures if v == reference})
  diffs = [measures[variant, s].get(name, np.nan) - measures[reference, s].get(name, np.nan)
           for s in seeds]
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
                     "mean": mean, "low": low, "high": high,
                     "resolved": bool(np.isfinite(low) and (low > 0 or high < 0))})
  return rows


def comparison_table(rows: list[dict]) -> list[str]:
  return report.markdown_table(
      ["measure", "variant - reference", "seeds", "mean difference", "95% interval", "resolved"],
      [[r["measure"], f"{r['variant']} - {r['reference']}", str(r["n"]), f"{r['mean']:+.4g}",
        f"[{r['low']:+.4g}, {r['high']:+.4g}]", "yes" if r["resolved"] else "no"] for r in rows])


def summary_table(measures: dict, variants, names) -> list[str]:
  """Per variant and measure: mean +- 95% half-width over seeds."""
  rows = []
  for variant in variants:
    row = [variant, str(sum(1 for v, _ in measures if v == variant))]
    for name in names:
      values = [m[name] for (v, _), m in measures.items()
                if v == variant and np.isfinite(m.get(name, np.nan))]
      mean, low, high = t_interval(values)
      row.append("n/a" if not values else f"{mean:.4g}" if not np.isfinite(low)
                 else f"{mean:.4g} ± {(high - low) / 2:.2g}")
    rows.append(row)
  return report.markdown_table(["variant", "runs"] + list(names), rows)


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
