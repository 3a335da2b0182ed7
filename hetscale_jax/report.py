r"""One markdown report for one or more training workdirs: a table comparing the runs, each
run's growth events and its figures (hetscale_jax.plots).

    python -m hetscale_jax.report --workdir workdirs/default workdirs/random [--out report.md]

A workdir needs summary.json and metrics.jsonl (train.train_and_evaluate writes both); its
figures come from <workdir>/plots. FLOPs need the run's config.json (written when training
claims the workdir) for the image and patch size; without it that column says n/a.

FLOPs are counted analytically, per image and forward pass, from the architecture summary:
2 x the multiply-adds of the patch embedding, of every dense layer (on every token; the head
on the class token only), of attention's two token-by-token products and of each unit's
r . x~ (d_in multiply-adds; its last entry is an offset). Elementwise work (norms, softmax,
activations, bias adds, the units' three activations) is left out. Counted with every unit
slot as a unit, the count equals that of every dot_general and convolution in the model's
jaxpr (tests/test_report.py checks this); the report counts the units the model has, not the
padded slots its program also computes (layers.py).
"""

import argparse
from collections.abc import Sequence
import datetime
import json
import os

import ml_collections

from hetscale_jax import ablation, input_pipeline, plots, spec, writers
from hetscale_jax import workdir as workdir_lib


# ---------------------------------------------------------------------------- FLOPs

def forward_flops(architecture: dict, image_shape: Sequence[int], patch_size: int) -> int:
  """Matmul FLOPs of one image's forward pass (see the module docstring)."""
  height, width, channels = image_shape
  patches = (height // patch_size) * (width // patch_size)
  tokens = patches + 1  # the class token
  layers = architecture["layers"]
  flops = 2 * patches * patch_size**2 * channels * layers["head"]["d_in"]
  for path, layer in layers.items():
    rows = 1 if path == "head" else tokens
    flops += 2 * rows * layer["d_in"] * layer["d_out"]
    flops += 2 * rows * spec.layer_units(layer) * layer["d_in"]  # r . x~ = r[:-1] . x + r[-1]
    if path.endswith("/qkv"):  # q k^T and softmax(.) v, each tokens^2 x heads * head_dim
      flops += 2 * 2 * tokens * tokens * (layer["d_out"] // 3)
  return flops


def config_flops(config, architecture: dict) -> int | None:
  """forward_flops for a run's config (dict or ConfigDict); None if its dataset is absent."""
  try:
    info = input_pipeline.dataset_info(ml_collections.ConfigDict(dict(config["data"])))
  except input_pipeline.DatasetNotFoundError:
    return None
  return forward_flops(architecture, info.image_shape, config["model"]["patch_size"])


# ---------------------------------------------------------------------------- reading runs

def load_run(workdir: str) -> dict:
  """summary.json, metrics by kind, config.json (or None) and the figures of one workdir."""
  summary = workdir_lib.read_summary(workdir)
  config = None
  if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE)) as f:
      config = json.load(f)
  figures = [plots.TRAINING, plots.UNITS]
  figures += [plots.eigenvalues_name(e["step"]) for e in summary["growth_events"]]
  figures = [os.path.join(plots.plots_dir(workdir), f) for f in figures]
  return {"workdir": workdir, "summary": summary, "metrics": writers.read_metrics(workdir),
          "config": config, "figures": [f for f in figures if os.path.exists(f)],
          "flops": config_flops(config, summary["architecture"]) if config else None}


def run_names(workdirs: Sequence[str]) -> list[str]:
  """The shortest trailing path parts that tell the workdirs apart."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for k in range(1, max(len(p) for p in parts) + 1):
    names = ["/".join(p[-k:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return list(workdirs)


# ---------------------------------------------------------------------------- markdown

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min"


def format_flops(flops: int | None) -> str:
  return "n/a" if flops is None else f"{flops / 1e6:,.2f}"


def format_tflops(compute: dict | None) -> str:
  """A run's training TFLOPs, + its growth events' (summary["compute"]); n/a where a count is
  missing (compute.run_compute)."""
  tflops = lambda flops: "n/a" if flops is None else f"{flops / 1e12:.4g}"
  compute = compute or {}
  return f"{tflops(compute.get('train_flops'))} + {tflops(compute.get('event_flops'))}"


def comparison_rows(runs: list[dict], names: list[str]) -> list[list[str]]:
  rows = []
  for name, run in zip(names, runs):
    s = run["summary"]
    rows.append([name, s["dataset"], f"{s['eval']['top1']:.2%}", f"{s['eval']['top5']:.2%}",
                 f"{s['base_params']:,}", f"{s['params']:,}", format_flops(run["flops"]),
                 str(len(s["growth_events"])), format_minutes(s["wall_seconds"]),
                 format_tflops(s.get("compute"))])  # absent from runs of earlier versions
  return rows


def growth_rows(summary: dict) -> list[list[str]]:
  rows = []
  for e in summary["growth_events"]:
    grown = ", ".join(f"{p} {n}" for p, n in sorted(e["grown"].items(),
                                                   key=lambda kv: plots.layer_order(kv[0])))
    rows.append([str(e["step"]), e["rule"], e.get("unit", "gated"), f"{e['params_before']:,}",
                 f"{e['params_after']:,}",
                 f"{e['seconds_spectrum']:.1f}", f"{e['seconds_compile']:.1f}", grown or "none"])
  return rows


def render(runs: list[dict], out_dir: str) -> str:
  """The report's markdown; image links are relative to out_dir."""
  names = run_names([r["workdir"] for r in runs])
  lines = [f"# hetscale_jax report: {len(runs)} run{'s' * (len(runs) > 1)}", "",
           f"Generated {datetime.datetime.now().isoformat(timespec='seconds')}.", "",
           "## Comparison", ""]
  lines += markdown_table(["run", "dataset", "top-1", "top-5", "params at start", "params at end",
                   "MFLOPs/image", "growth events", "wall time", "TFLOPs: train + events"],
                          comparison_rows(runs, names))
  lines += ["", "Top-1/top-5: the final evaluation on the test split. MFLOPs: forward pass of "
            "one image, 2 x multiply-adds of the patch embedding, dense layers, attention "
            "products and units, counted from the final architecture (elementwise work not "
            "counted; n/a: no config.json in the workdir). Wall time: the training loop, "
            "growth events and their recompiles included. TFLOPs: XLA's count of each "
            "architecture's compiled train step times its steps, plus the growth events' own "
            "work (hetscale_jax/compute.py says what it leaves out).", ""]
  for name, run in zip(names, runs):
    s = run["summary"]
    lines += [f"## {name}", "", f"Workdir `{run['workdir']}`: {s['steps']} steps on "
              f"{s['dataset']}, final top-1 {s['eval']['top1']:.2%} on {s['eval']['count']} "
              f"test images, {s['params']:,} parameters ({s['base_params']:,} at the start).", ""]
    if s["growth_events"]:
      lines += ["Growth events (seconds: spectrum computation, train-step recompilation):", ""]
      lines += markdown_table(["step", "rule", "unit", "params before", "params after",
                               "spectrum s", "recompile s", "neurons grown per layer"],
                              growth_rows(s))
      lines += ["", "Units per layer at the end:", "", "```", spec.describe(s["architecture"]),
                "```", ""]
      if s.get("unit_ablation"):
        lines += ["What the units carry: the test metrics with every unit switched off, and "
                  "each grown layer's mean |unit contribution|:", "", "```",
                  ablation.describe(s["unit_ablation"]), "```", ""]
    else:
      lines += ["No growth events (a static model).", ""]
    for figure in run["figures"]:
      caption = os.path.splitext(os.path.basename(figure))[0]
      lines += [f"![{name}: {caption}]({os.path.relpath(figure, out_dir)})", ""]
  return "\n".join(lines)


def write_report(workdirs: Sequence[str], out: str) -> str:
  runs = [load_run(w) for w in workdirs]
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  text = render(runs, out_dir)
  with open(out, "w") as f:
    f.write(text)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", nargs="+", required=True, help="training workdirs")
  parser.add_argument("--out", default="report.md",
                      help="markdown file to write; figures are linked relative to it")
  args = parser.parse_args(argv)
  missing = [w for w in args.workdir if not os.path.exists(workdir_lib.summary_path(w))]
  if missing:
    parser.error(f"no summary.json in {missing}: not finished training workdirs")
  write_report(args.workdir, args.out)
  print(f"wrote {args.out} ({len(args.workdir)} runs)")


if __name__ == "__main__":
  main()
