"""Images/s of the ImageNet-100 train transform on this machine's CPU, and host cores per chip.

  python benchmarks/input_pipeline.py [--num_images 256] [--seconds 10]

The JPEGs are generated from the two real photos that ship with scikit-learn (china.jpg,
flower.jpg), cropped at random and resized to typical ImageNet sizes (about 400 x 350 pixels,
quality 90), so decoding costs what it costs on ImageNet. Three measurements:

  1. the train transform (decode + crop, bicubic resize to 224, flip, RandAugment m9 mstd0.5,
     normalise, random erasing) on one core: tf.data with a single thread;
  2. the same on all cores (parallel map, AUTOTUNE);
  3. input_pipeline.train_batches end to end on a prepared ImageNet-100 folder of those JPEGs
     (file reads from the page cache, batching, conversion to numpy), all cores.

Cores needed per accelerator = its DeiT-S training speed / images per second per core of (1).
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from PIL import Image
import sklearn
import sklearn.datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from hetscale_jax import datasets
from hetscale_jax import input_pipeline
from hetscale_jax import prepare_imagenet100

# DeiT-S training throughput (images/s) the input pipeline has to keep up with; assumptions,
# not measurements: bf16 on one H100, and a TPU v4-8 (4 chips, one host).
ACCELERATOR_SPEED = {"1x H100 (DeiT-S, bf16)": 2500, "TPU v4-8 (DeiT-S)": 3000}
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (400, 300), (500, 400), (320, 320)]


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def generated_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  photos = [np.asarray(p) for p in sklearn.datasets.load_sample_images().images]
  jpegs = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    size = IMAGENET_SIZES[rng.integers(len(IMAGENET_SIZES))]
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BICUBIC)
    jpegs.append(tf.io.encode_jpeg(np.asarray(image), quality=90).numpy())
  return jpegs


def images_per_second(iterator, batch_size: int, seconds: float) -> float:
  for _ in range(3):  # Warm-up: tracing, thread pools, autotuning.
    next(iterator)
  start, images = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(iterator)
    images += batch_size
  return images / (time.perf_counter() - start)


def transform_rate(jpegs, data_config, threads: int | None, seconds: float) -> float:
  """Train transform alone: one thread (threads=1) or tf.data's choice (None)."""
  transform = input_pipeline.train_transform(data_config)
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(lambda i, jpeg: transform(jpeg, tf.stack([tf.constant(0, tf.int64), i])),
              num_parallel_calls=threads or tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.max_intra_op_parallelism = 1
  if threads:
    options.threading.private_threadpool_size = threads
  ds = ds.batch(32).prefetch(2).with_options(options)
  return images_per_second(iter(ds), 32, seconds)


def write_prepared_imagenet100(jpegs, data_dir: str) -> None:
  """A prepared ImageNet-100 folder (prepare_imagenet100's layout) holding `jpegs`."""
  root = prepare_imagenet100.dataset_dir(data_dir)
  wnids = prepare_imagenet100.wnids()
  lines = []
  for k, jpeg in enumerate(jpegs):
    label = k % len(wnids)
    path = f"train/{wnids[label]}/{k:07d}.JPEG"
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    with open(os.path.join(root, path), "wb") as f:
      f.write(jpeg)
    lines.append(f"{path}\t{label}\n")
  for split in prepare_imagenet100.SPLITS:
    with open(os.path.join(root, f"{split}.tsv"), "w") as f:
      f.write("".join(lines))
  with open(os.path.join(root, prepare_imagenet100.METADATA), "w") as f:
    json.dump({"wnids": wnids, "num_examples": {s: len(jpegs) for s in prepare_imagenet100.SPLITS}},
              f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0))
  print(f"CPU: {cpu_model()}, {cores} cores available ({os.cpu_count()} in the machine), "
        f"load average {os.getloadavg()[0]:.2f} before the run (other work skews the figures)")
  print(f"python {platform.python_version()}, tensorflow {tf.__version__}, tensorflow-datasets "
        f"{tfds.__version__}, jax {jax.__version__}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}")

  jpegs = generated_jpegs(args.num_images)
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  print(f"{len(jpegs)} generated JPEGs, {mean_kb:.0f} KiB on average, ImageNet-like sizes")
  config = datasets.default_data_config("imagenet100")
  print("transform: imagenet100 defaults, " + ", ".join(f"{k}={config[k]}" for k in (
      "image_size", "crop_scale_min", "hflip", "randaugment_layers", "randaugment_magnitude",
      "randaugment_mstd", "random_erasing")))

  one_core = transform_rate(jpegs, config, 1, args.seconds)
  print(f"(1) train transform, 1 core:        {one_core:7.1f} images/s")
  all_cores = transform_rate(jpegs, config, None, args.seconds)
  print(f"(2) train transform, {cores} cores:       {all_cores:7.1f} images/s "
        f"({all_cores / cores:.1f} per core)")
  with tempfile.TemporaryDirectory() as data_dir:
    write_prepared_imagenet100(jpegs, data_dir)
    config.data_dir = data_dir
    batches = input_pipeline.train_batches(
        config, global_batch_size=args.batch_size, seed=0, process_index=0, process_count=1)
    end_to_end = images_per_second(batches, args.batch_size, args.seconds)
  print(f"(3) train_batches end to end, {cores} cores: {end_to_end:7.1f} images/s "
        f"({end_to_end / cores:.1f} per core), batch {args.batch_size}")

  print("Host cores needed to feed DeiT-S training, from (1), assuming a core keeps its "
        "one-core rate:")
  for accelerator, speed in ACCELERATOR_SPEED.items():
    print(f"  {accelerator} at ~{speed} images/s (assumed): {speed / one_core:.0f} cores")


if __name__ == "__main__":
  main()
