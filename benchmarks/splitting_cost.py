"""Cost of the full splitting spectrum (every neuron of every growable layer) on DeiT shapes.

    python benchmarks/splitting_cost.py            # DeiT-Ti and DeiT-S, full width and depth
    python benchmarks/splitting_cost.py --quick    # DeiT-Ti, probe batch 4, one run each

For each model and probe batch it measures, in one process and after compiling/warming up:

* the unit: one train-step gradient, jax.grad of the same loss on the same probe batch (jitted);
* the spectrum with the default num_iters, for both methods ("collected", "streamed"), in
  units of that gradient;
* peak memory of each jitted function from XLA's compiled memory_analysis() (temporaries plus
  outputs, arguments excluded: the same parameters and batch for all of them);
* the naive method: one forward/backward pass collecting x~, z, g, then every S_j built
  explicitly and eigendecomposed (numpy.linalg.eigh, float32). Building and decomposing every
  S_j of DeiT-S would take many minutes on a CPU, so it is timed on a few neurons per layer
  shape (every block has the same four shapes) and extrapolated linearly to all neurons; its
  memory is that of one layer's S_j held at once (d_out (d_in+1)^2 floats), also computed, not
  measured. Both are printed as such. Per neuron the best of a few times is taken: numpy's
  multithreaded eigh ran up to 10x slower while other work took a core, and the best time
  understates the naive cost, which makes the speed ratio conservative.

Targets (set when the spectrum was designed): full spectrum <= 12 train-step gradients at DeiT-S widths; >= 5x faster
than the naive method.
"""

import argparse
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from hetscale_jax import layers, splitting
from hetscale_jax.models import deit

NUM_CLASSES = 100


def machine_line() -> str:
  model = platform.processor() or "unknown"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  device = jax.devices()[0]
  return (f"machine: {device.device_kind} ({jax.default_backend()}), CPU {model}, "
          f"{len(os.sched_getaffinity(0))} cores available, load average "
          f"{os.getloadavg()[0]:.2f} at start (other work on the machine skews timings)\n"
          f"versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib "
          f"{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"numpy {np.__version__}")


def timed(fn, *args, repeats: int, warmup: bool = True) -> float:
  """Median wall time of fn(*args) over `repeats` runs, after one warm-up run."""
  if warmup:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compile_with_peak(jitted, *args):
  """(compiled function, seconds to compile, temporaries + outputs in bytes from XLA's static
  memory analysis). Timing the compiled object avoids compiling a second time."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return compiled, seconds, int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 1 << 62


def mib(n: float) -> str:
  return f"{n / 2**20:,.0f} MiB"


def make_problem(variant: str, img_size: int, patch_size: int, batch_size: int):
  model = deit.create(variant, num_classes=NUM_CLASSES, img_size=img_size, patch_size=patch_size)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, img_size, img_size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), images)

  def loss_fn(variables, batch):
    images, labels = batch
    logits = model.apply(variables, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return model, variables, (images, labels), loss_fn


def naive_cost(loss_fn, variables, batch, neurons_per_shape: int, rng):
  """Seconds and bytes of building every S_j explicitly and eigendecomposing it.

  Returns (collect seconds, extrapolated eigen seconds, layer-at-once bytes, details).
  """
  collect = jax.jit(lambda v, b: splitting.collect_layer_statistics(loss_fn, v, b))
  collect_seconds = timed(collect, variables, batch, repeats=1)
  stats = jax.device_get(collect(variables, batch))
  second = jax.vmap(jax.vmap(jax.grad(jax.grad(layers.activation_fn("gelu")))))
  by_shape = {}
  for path, (x_tilde, z, g) in stats.items():
    by_shape.setdefault((x_tilde.shape[1], z.shape[1]), []).append(path)
  total_seconds, largest_bytes, details = 0.0, 0, []
  for (n, d_out), paths in sorted(by_shape.items()):
    x_tilde, z, g = stats[paths[0]]
    weight = np.asarray(g * second(jnp.asarray(z)), np.float32)
    chosen = rng.choice(d_out, neurons_per_shape, replace=False)
    times = []
    for j in chosen:
      start = time.perf_counter()
      s_j = (x_tilde * weight[:, j:j + 1]).T @ x_tilde
      eigvals, eigvecs = np.linalg.eigh(s_j)
      _ = (eigvals[0], eigvecs[:, 0])
      times.append(time.perf_counter() - start)
    # The best of the few: multithreaded LAPACK slows down many times over when other work
    # takes a core, and the fastest time understates the naive cost (conservative here).
    per_neuron = min(times)
    total_seconds += per_neuron * d_out * len(paths)
    largest_bytes = max(largest_bytes, d_out * n * n * 4)
    details.append(f"{len(paths)} layers {n - 1}->{d_out}: {per_neuron * 1e3:.1f} ms/neuron "
                   f"(best of {neurons_per_shape})")
  return collect_seconds, total_seconds, largest_bytes, details


def hvp_seconds(method, loss_fn, variables, batch, shapes, repeats):
  """(seconds of one product S V for all neurons of all layers, seconds of the statistics
  pass that precedes the products: 0 for the streamed form)."""
  activations = {p: s["activation"] for p, s in shapes.items()}
  vecs = {p: jnp.ones((s["d_out"], s["d_in"] + 1), jnp.float32) for p, s in shapes.items()}
  if method == "collected":
    collect = jax.jit(lambda v, b: splitting.collect_layer_statistics(loss_fn, v, b))
    stats = collect(variables, batch)
    product = jax.jit(lambda st, vv: splitting.collected_hvp(st, activations)(vv))
    return (timed(product, stats, vecs, repeats=repeats),
            timed(collect, variables, batch, repeats=repeats))
  product = jax.jit(lambda v, b, vv: splitting.streamed_hvp(loss_fn, v, b, activations)(vv))
  return timed(product, variables, batch, vecs, repeats=repeats), 0.0


def naive_benchmark(variant, img_size, patch_size, batch_size, naive_neurons):
  """(seconds, bytes) of the naive method; prints how they were obtained."""
  model, variables, batch, loss_fn = make_problem(variant, img_size, patch_size, batch_size)
  shapes = splitting.find_growable_layers(loss_fn, variables, batch)
  collect_seconds, eigen_seconds, naive_bytes, details = naive_cost(
      loss_fn, variables, batch, naive_neurons, np.random.default_rng(0))
  naive_seconds = collect_seconds + eigen_seconds
  print(f"DeiT-{variant} batch {batch_size}: naive (explicit S_j + numpy eigh, float32), "
        f"EXTRAPOLATED from a few neurons per layer shape: {naive_seconds:.1f} s (statistics "
        f"pass {collect_seconds:.2f} s measured; " + "; ".join(details) + "); memory COMPUTED, "
        f"not measured: one layer's S_j at once = {mib(naive_bytes)}, all layers at once "
        f"{mib(4 * sum(s['d_out'] * (s['d_in'] + 1) ** 2 for s in shapes.values()))}", flush=True)
  return naive_seconds, naive_bytes


def benchmark(variant, img_size, patch_size, batch_size, repeats, naive, methods):
  model, variables, batch, loss_fn = make_problem(variant, img_size, patch_size, batch_size)
  shapes = splitting.find_growable_layers(loss_fn, variables, batch)
  growable = sum(s["d_out"] * (s["d_in"] + 1) for s in shapes.values())
  tokens = batch_size * ((img_size // patch_size) ** 2 + 1)
  num_iters = splitting.DEFAULT_NUM_ITERS
  print(f"\n== DeiT-{variant}: width {model.width}, depth {model.depth}, {len(shapes)} growable "
        f"layers, {sum(s['d_out'] for s in shapes.values()):,} neurons, {growable:,} S_j "
        f"dimensions in all; {img_size} px, patch {patch_size}, batch {batch_size} "
        f"({tokens} probe tokens), num_iters {num_iters}", flush=True)

  grad_fn, grad_compile, grad_bytes = compile_with_peak(jax.jit(jax.grad(loss_fn)), variables, batch)
  grad_seconds = timed(grad_fn, variables, batch, repeats=max(3, 3 * repeats))
  print(f"train-step gradient: {grad_seconds * 1e3:.1f} ms, peak {mib(grad_bytes)} "
        f"(compiled in {grad_compile:.1f}s)", flush=True)

  naive_seconds, naive_bytes = naive
  rows = {}
  for method in methods:
    # splitting._spectrum is what grow.splitting_spectrum runs after checking its arguments:
    # two jitted programs for "collected" (statistics, then the solve), compiled here as one.
    key = jax.random.key(0)
    spectrum = jax.jit(lambda v, b, k, method=method: splitting._spectrum(
        loss_fn, v, b, k, num_iters, method))
    run, compile_seconds, spectrum_bytes = compile_with_peak(spectrum, variables, batch, key)
    if spectrum_bytes > 0.8 * available_bytes():
      print(f"spectrum, {method:>9}: NOT RUN, needs {mib(spectrum_bytes)} of which "
            f"{mib(available_bytes())} is available (compiled in {compile_seconds:.1f}s)")
      continue
    seconds = timed(run, variables, batch, key, repeats=repeats, warmup=repeats > 1)
    del run
    product, statistics = hvp_seconds(method, loss_fn, variables, batch, shapes, max(3, repeats))
    rows[method] = (seconds, spectrum_bytes)
    # Timed alone, a product runs all layers side by side and redoes the linearisation, so it
    # is no exact share of the spectrum's time: printed as a scale, not subtracted.
    print(f"spectrum, {method:>9}: {seconds:.2f} s = {seconds / grad_seconds:.1f} train-step "
          f"gradients; peak {mib(spectrum_bytes)} = {spectrum_bytes / grad_bytes:.1f}x the "
          f"gradient's (compiled in {compile_seconds:.1f}s)\n"
          f"  {num_iters} Lanczos steps, each one product S V of all neurons (timed alone: "
          f"{product * 1e3:.1f} ms = {product / grad_seconds:.2f} gradients)"
          + (f", after one statistics pass (timed alone: {statistics / grad_seconds:.2f} gradients)"
             if statistics else ""), flush=True)

  print(f"naive: {naive_seconds:.1f} s = {naive_seconds / grad_seconds:.0f} train-step gradients "
        f"(extrapolated, see above)")
  for method, (seconds, spectrum_bytes) in rows.items():
    print(f"  {method:>9} vs naive: {naive_seconds / seconds:.1f}x faster, naive needs "
          f"{naive_bytes / spectrum_bytes:.1f}x its memory (one layer at a time)")
  return {"variant": variant, "batch": batch_size, "grad_seconds": grad_seconds,
          "grad_bytes": grad_bytes, "methods": rows, "naive_seconds": naive_seconds,
          "naive_bytes": naive_bytes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="DeiT-Ti only, probe batch 4, one run each (about 3 minutes on 2 cores)")
  parser.add_argument("--variants", default="Ti,S")
  parser.add_argument("--img-size", type=int, default=32)
  parser.add_argument("--patch-size", type=int, default=8)
  parser.add_argument("--batch-sizes", default=None,
                      help="comma-separated probe batch sizes (default 64; --quick: 4)")
  parser.add_argument("--methods", default="collected,streamed")
  args = parser.parse_args()
  batch_sizes = [int(b) for b in (args.batch_sizes or ("4" if args.quick else "64")).split(",")]
  if args.quick and args.variants == parser.get_default("variants"):
    args.variants = "Ti"  # DeiT-S alone compiles and runs for several minutes on 2 cores
  repeats, naive_neurons = (1, 2) if args.quick else (2, 6)
  print(machine_line())
  print(f"splitting.DEFAULT_NUM_ITERS = {splitting.DEFAULT_NUM_ITERS}; float32 on "
        f"{jax.default_backend()}; timings are medians over {repeats} run(s) after a warm-up")
  configs = [(v, b) for v in args.variants.split(",") for b in batch_sizes]
  # The naive method first, for every configuration, before the spectra take gigabytes.
  print("\n== naive method")
  naive = {c: naive_benchmark(c[0], args.img_size, args.patch_size, c[1], naive_neurons)
           for c in configs}
  results = [benchmark(v, args.img_size, args.patch_size, b, repeats, naive[(v, b)],
                       args.methods.split(",")) for v, b in configs]
  print("\n== summary (targets: <= 12 train-step gradients at DeiT-S widths; >= 5x faster than "
        "naive)")
  for r in results:
    for method, (seconds, spectrum_bytes) in r["methods"].items():
      print(f"DeiT-{r['variant']:<2} batch {r['batch']:>3} {method:>9}: "
            f"{seconds / r['grad_seconds']:6.1f} train-step gradients, "
            f"{r['naive_seconds'] / seconds:7.1f}x faster than naive (extrapolated), peak "
            f"{mib(spectrum_bytes)} ({spectrum_bytes / r['grad_bytes']:.1f}x the gradient's, "
            f"naive one layer {mib(r['naive_bytes'])})")


if __name__ == "__main__":
  main()
