"""Exports a run's variables for research code: `python -m hetscale_jax.export --workdir DIR`.

From the workdir's newest usable checkpoint (the final one once the run finished) it writes
<workdir>/export/step_<N>/, or --out:

  variables.msgpack  {"params", "growth"}, numpy arrays in flax's msgpack: load them with
                     flax.serialization.msgpack_restore(f.read()) and apply the model of
                     config.json (train.create_model), whose layers read their units from them
  spec.json          the grown architecture (hetscale_jax.spec.from_json reads it)
  config.json        the run's config
  architecture.txt   for people: parameter counts and the units of every grown layer

Needs neither the dataset nor the devices that trained. The folder is written under a
temporary name and renamed when complete, and an existing export is never overwritten.
"""

import argparse
import json
import os

from etils import epath
import flax

from hetscale_jax import checkpoint, spec


def describe(final: checkpoint.Final, workdir: str) -> str:
  """Parameter counts and spec.describe of a checkpoint's variables."""
  total = spec.count_params(final.variables)
  units = spec.unit_params(final.architecture)
  num_units = spec.num_units(final.architecture)
  m = final.config["model"]
  return "\n".join([
      f"{workdir}: checkpoint at step {final.step} (config: DeiT-{m['variant']}, "
      f"{final.config['num_epochs']} epochs on {final.config['data']['name']})",
      f"parameters: {total:,} = {total - units:,} before growth + {units:,} in {num_units} units",
      "grown layers (units per kind, and how many sit at each depth on their neuron):",
      spec.describe(final.architecture), ""])


def export(workdir: str, out: str | None = None) -> str:
  """Writes the export of `workdir`'s newest usable checkpoint; returns its folder."""
  final = checkpoint.read_latest(workdir)
  out = epath.Path(out) if out else epath.Path(workdir) / "export" / f"step_{final.step}"
  if out.exists():
    raise FileExistsError(f"{out} exists; nothing was overwritten (pass another --out)")
  staging = out.parent / f"{out.name}.partial-{os.getpid()}"
  staging.mkdir(parents=True)
  files = {"variables.msgpack": flax.serialization.msgpack_serialize(final.variables),
           "spec.json": spec.to_json(final.architecture).encode(),
           "config.json": json.dumps(final.config, indent=1, sort_keys=True).encode(),
           "architecture.txt": describe(final, workdir).encode()}
  for name, data in files.items():
    (staging / name).write_bytes(data)
  staging.rename(out)
  return str(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--out", help="output folder (default: <workdir>/export/step_<N>)")
  args = parser.parse_args(argv)
  try:
    out = export(args.workdir, args.out)
  except (checkpoint.CheckpointError, FileExistsError) as e:
    raise SystemExit(f"error: {e}") from None
  print((epath.Path(out) / "architecture.txt").read_text() + f"exported to {out}")


if __name__ == "__main__":
  main()
