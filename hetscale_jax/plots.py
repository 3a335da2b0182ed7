"""Figures of a run, PNG files in <workdir>/plots, drawn at each growth event and at the end.

    eigenvalues_step{N}.png  each neuron's smallest splitting eigenvalue in the first block's
                             QKV and FC1 layers at growth event N, grown neurons marked
                             (the paper's Figure 2)
    units_step{N}.png        units per neuron of every dense layer after event N: where the
    units.png                model grew deeper (units.png: the latest)
    training.png             train loss, top-1 and parameter count over training

Drawn with matplotlib's object API on the Agg canvas: no pyplot state and no GUI backend, so
training code can call this safely. Kept cheap (well under a second a figure on one core):
fixed margins instead of a layout engine, and one artist per colour instead of a patch per
neuron. Only process 0 draws, as only it writes metrics.
"""

import re

from etils import epath
import jax
from matplotlib import colormaps
from matplotlib import colors
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from hetscale_jax import layers, spec, writers
from hetscale_jax import workdir as workdir_lib

FIGURE2_LAYERS = ("blocks_0/attn/qkv", "blocks_0/mlp/fc1")
TRAINING = "training.png"
UNITS = "units.png"
GROWN, NOT_GROWN = "tab:red", "tab:blue"


def plots_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / workdir_lib.PLOTS_DIR


def eigenvalues_name(step: int) -> str:
  return f"eigenvalues_step{step}.png"


def units_name(step: int) -> str:
  return f"units_step{step}.png"


def layer_order(path: str):
  """Sort key: blocks in numeric order (blocks_2 before blocks_10), then the layer name."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def save(fig: Figure, path: epath.PathLike):
  FigureCanvasAgg(fig)
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, dpi=100, format="png")


# ---------------------------------------------------------------------------- growth events

def growth_event_figures(workdir: str, step: int, spectrum, plan, variables):
  """Draws eigenvalues_step{step}.png, units_step{step}.png and units.png (process 0 only).

  spectrum: {path: Spectrum} of the event (host arrays); plan: the grow.Plan applied;
  variables: the grown model's {"params", "growth"}.
  """
  if jax.process_index() != 0:
    return
  plots_dir(workdir).mkdir(parents=True, exist_ok=True)
  grown = {p: np.asarray(i) for p, i in plan.indices.items()}
  figure2 = [p for p in FIGURE2_LAYERS if p in spectrum]
  if figure2:
    save(eigenvalue_figure(step, {p: spectrum[p] for p in figure2}, grown),
          plots_dir(workdir) / eigenvalues_name(step))
  units = units_per_neuron(variables)
  path = plots_dir(workdir) / units_name(step)
  save(units_figure(step, units), path)
  path.copy(plots_dir(workdir) / UNITS, overwrite=True)


def eigenvalue_figure(step: int, spectrum: dict, grown: dict) -> Figure:
  """One panel per layer: eigenvalue / mean |x~|^2 (the score the rules rank) per neuron."""
  fig = Figure(figsize=(5 * len(spectrum), 3.2))
  fig.subplots_adjust(left=0.16 / len(spectrum), right=0.98, bottom=0.15, top=0.9, wspace=0.3)
  for ax, (path, s) in zip(fig.subplots(1, len(spectrum), squeeze=False)[0], spectrum.items()):
    lam = np.asarray(s.eigvals, np.float64) / float(s.input_scale)
    chosen = np.zeros(lam.shape, bool)
    chosen[grown.get(path, [])] = True
    # Bars as vertical lines, about a neuron wide: one artist per colour however wide the layer.
    width = max(250 / lam.size, 0.3)
    for mask, color in ((~chosen, NOT_GROWN), (chosen, GROWN)):
      ax.vlines(np.flatnonzero(mask), 0.0, lam[mask], colors=color, linewidth=width)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set(title=f"{path}, step {step}", xlabel="neuron",
           ylabel=r"smallest eigenvalue / mean $|\tilde x|^2$", xlim=(-0.5, lam.size - 0.5))
    ax.legend(handles=[patches.Patch(color=NOT_GROWN, label="not grown"),
                       patches.Patch(color=GROWN, label=f"grown ({chosen.sum()})")],
              fontsize=8, loc="lower right")
  return fig


def units_per_neuron(variables) -> dict[str, np.ndarray]:
  """{path: units stacked on each neuron} for every dense layer, in block order, read from
  the unit indices of the variables' growth collection."""
  layers_spec = spec.from_variables(variables)["layers"]
  grown = layers.grown_layers(variables)
  units = {}
  for path in sorted(layers_spec, key=layer_order):
    units[path] = np.zeros(layers_spec[path]["d_out"], np.int32)
    for pack in grown.get(path, {}).values():
      np.add.at(units[path], np.asarray(pack.index)[np.asarray(pack.live)], 1)
  return units


def units_figure(step: int, units: dict[str, np.ndarray]) -> Figure:
  """Rows are layers, columns neurons, colour the units stacked on a neuron (depth gained)."""
  width = max(u.size for u in units.values())
  grid = np.full((len(units), width), np.nan)
  for row, u in enumerate(units.values()):
    grid[row, :u.size] = u
  top = max(int(np.nanmax(grid)), 1)
  # One colour per unit count, light grey for none, so grown neurons stand out.
  cmap = colors.ListedColormap(["#e8e8e8"] + list(colormaps["viridis"].resampled(top).colors))
  norm = colors.BoundaryNorm(np.arange(-0.5, top + 1), cmap.N)
  height = 1.2 + 0.22 * len(units)
  fig = Figure(figsize=(9, height))
  fig.subplots_adjust(left=0.22, right=0.98, bottom=0.6 / height, top=1 - 0.35 / height)
  ax = fig.subplots()
  image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                    cmap=cmap, norm=norm)
  labels = [f"{p}  ({np.count_nonzero(u)}/{u.size})" for p, u in units.items()]
  ax.set_yticks(range(len(units)), labels, fontsize=7)
  ax.set(xlabel="neuron", title=f"units per neuron after step {step} (grown/neurons per layer)")
  fig.colorbar(image, ax=ax, ticks=range(top + 1), label="units")
  return fig


# ---------------------------------------------------------------------------- end of training

def final_figures(workdir: str):
  """Draws training.png from metrics.jsonl (process 0 only)."""
  if jax.process_index() != 0:
    return
  plots_dir(workdir).mkdir(parents=True, exist_ok=True)
  records = writers.read_metrics(workdir)
  save(training_figure(records), plots_dir(workdir) / TRAINING)


def training_figure(by_kind: dict[str, list[dict]]) -> Figure:
  """Loss, top-1 and parameters against step; dashed lines at growth events."""
  series = lambda kind, key: ([r["step"] for r in by_kind[kind]], [r[key] for r in by_kind[kind]])
  fig = Figure(figsize=(12, 3.2))
  fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
  ax_loss, ax_top1, ax_params = fig.subplots(1, 3)
  ax_loss.plot(*series("train", "loss"), color="tab:blue")
  ax_loss.set(title="train loss", xlabel="step")
  steps, top1 = series("eval", "top1")
  ax_top1.plot(steps, 100 * np.asarray(top1), "o-", color="tab:green")
  ax_top1.set(title="test top-1 (%)", xlabel="step")
  # Parameters change only at growth events: a step function from step 0 through them.
  steps, params = series("train", "params")
  growth = by_kind["growth"]
  steps += [0] + [g["step"] for g in growth]
  params += [growth[0]["params_before"] if growth else params[0]]
  params += [g["params_after"] for g in growth]
  order = np.argsort(steps, kind="stable")
  ax_params.step(np.asarray(steps)[order], np.asarray(params)[order], where="post", color="tab:red")
  ax_params.set(title="parameters", xlabel="step")
  for ax in (ax_loss, ax_top1, ax_params):
    for g in growth:
      ax.axvline(g["step"], color="gray", ls="--", lw=0.8)
  return fig
