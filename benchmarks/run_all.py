r"""Every benchmark, one after another, each in its own process; prints everything they print.

  python benchmarks/run_all.py [--quick] [--markdown BENCHMARKS.md]

--quick: shorter measurements and the tiny model where a benchmark allows (a smoke run of the
whole set in a few minutes; its figures are noisier). --markdown also writes the date, the
machine and each benchmark's command and output to a markdown file, for BENCHMARKS.md.
Run from anywhere; a benchmark that fails is reported and the others still run.
"""

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, "configs")

# (title, script, arguments, arguments with --quick; None: skipped with --quick)
BENCHMARKS = [
    ("Train step: GrowableDense vs nn.Dense, grown vs static (default config)", "train_step.py",
     ["--steps=20", "--rounds=15"], ["--steps=5", "--rounds=3"]),
    ("Train step at DeiT-S shapes (CIFAR-100 config, batch 8, float32)", "train_step.py",
     [f"--config={CONFIGS}/deit_s_cifar100.py", "--config.batch_size=8",
      "--config.model.dtype=float32", "--steps=2", "--rounds=5"], None),
    ("Recompilation per growth event, with and without the persistent cache", "recompile.py",
     [], [f"--config={CONFIGS}/tiny_test.py"]),
    ("Splitting spectrum cost", "splitting_cost.py", [], ["--quick"]),
    ("Input pipeline", "input_pipeline.py", [],
     ["--seconds=2", "--num_images=64", "--batch_size=32"]),
]


def run(script: str, args: list[str]) -> tuple[int, str, str, float]:
  """Runs one benchmark, echoing its stdout; returns (exit code, stdout, stderr, seconds)."""
  start = time.perf_counter()
  process = subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stdout:
    print(line, end="", flush=True)
    lines.append(line)
  stderr = process.stderr.read()
  return process.wait(), "".join(lines), stderr, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="short measurements, tiny model")
  parser.add_argument("--markdown", help="also write the results to this markdown file")
  args = parser.parse_args()

  # In a child process: JAX initialised here would hold the accelerator's memory throughout.
  machine = subprocess.run([sys.executable, "-c", "import common; print(common.machine())"],
                           cwd=HERE, check=True, capture_output=True, text=True).stdout.strip()
  date = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
  print(f"{date}\n{machine}\n", flush=True)
  sections = []
  for title, script, full, quick in BENCHMARKS:
    bench_args = quick if args.quick else full
    command = " ".join(["python", f"benchmarks/{script}", *(bench_args or [])])
    command = command.replace(REPO + "/", "")
    print(f"=== {title}\n$ {command}", flush=True)
    if bench_args is None:
      output = note = "(skipped with --quick)"
    elif not os.path.exists(os.path.join(HERE, script)):
      output = note = f"(benchmarks/{script} does not exist yet)"
    else:
      code, output, stderr, seconds = run(script, bench_args)  # its output was echoed live
      note = f"({seconds:.0f} s)"
      if code:
        # The last lines of stderr say why; the rest is library start-up chatter.
        tail = "\n".join(stderr.splitlines()[-15:])
        note = f"FAILED with exit code {code}:\n{tail}\n{note}"
      output += note
    print(note + "\n", flush=True)
    sections.append((title, command, output))

  if args.markdown:
    lines = ["# Benchmark figures", "", f"Measured {date} with `python benchmarks/run_all.py"
             f"{' --quick' if args.quick else ''}`.", "", f"Machine: {machine}.", ""]
    for title, command, output in sections:
      lines += [f"## {title}", "", f"`{command}`", "", "```", output.strip(), "```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w") as f:
      f.write("\n".join(lines))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
  main()
