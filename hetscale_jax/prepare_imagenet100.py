r"""Builds ImageNet-100 once from tfds `imagenet2012` (docs/method.md, "Data and sampling").

  python -m hetscale_jax.prepare_imagenet100 \
      --manual_dir /data/imagenet --data_dir ~/tensorflow_datasets

ImageNet-100 is the 100 classes listed in data/imagenet100_wnids.txt, labelled by the rank of
their wnid in sorted order. If tfds has not prepared imagenet2012 yet (in --imagenet2012_dir,
default --data_dir), it does so first from the manual download in --manual_dir
(ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar); that writes all of ImageNet-2012 once,
about 150 GB, so point --imagenet2012_dir at a prepared copy where one exists. Then the 100
classes' JPEG bytes are copied unchanged, never decoded, into

  <data_dir>/imagenet100/1.0.0/
    {train,validation}/<wnid>/<k>.JPEG   one file per image
    {train,validation}.tsv               one line per image: relative path <TAB> new label
    metadata.json                        written last; it marks the dataset as prepared

so training reads 130k images instead of 1.28M. One file per image gives the input pipeline
random access to any example from pure TensorFlow (tf.io.read_file), which its global,
exactly resumable shuffle and DeiT's repeated augmentation need; TFRecord shards can only be
read in order.
"""

import argparse
from collections.abc import Sequence
import importlib.resources
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NAME = "imagenet100"
VERSION = "1.0.0"
SPLITS = ("train", "validation")
METADATA = "metadata.json"


def dataset_dir(data_dir: str | None) -> str:
  """Where the prepared dataset lives; data_dir None means tfds' default data dir."""
  return os.path.join(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR), NAME, VERSION)


def is_prepared(root: str) -> bool:
  return tf.io.gfile.exists(os.path.join(root, METADATA))


def read_metadata(root: str) -> dict:
  with tf.io.gfile.GFile(os.path.join(root, METADATA)) as f:
    return json.load(f)


def read_split(root: str, split: str) -> tuple[list[str], np.ndarray]:
  """(absolute JPEG paths, int32 labels) of a prepared split, in file order."""
  with tf.io.gfile.GFile(os.path.join(root, f"{split}.tsv")) as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  return [os.path.join(root, path) for path, _ in rows], np.array([l for _, l in rows], np.int32)


def wnids() -> list[str]:
  """The 100 class ids, sorted: the position of a wnid is its label."""
  text = (importlib.resources.files("hetscale_jax") / "data" / "imagenet100_wnids.txt").read_text()
  return sorted(text.split())


def _label_table(source_names: Sequence[str], keep: Sequence[str]) -> np.ndarray:
  """Maps imagenet2012 labels to ImageNet-100 labels; -1 for the classes that are dropped."""
  missing = sorted(set(keep) - set(source_names))
  if missing:
    raise ValueError(f"wnids not among imagenet2012's classes: {missing}")
  table = np.full(len(source_names), -1, np.int64)
  table[[list(source_names).index(w) for w in keep]] = np.arange(len(keep))
  return table


def _write_split(source: tf.data.Dataset, root: str, split: str, table: np.ndarray,
                 classes: Sequence[str]) -> int:
  """Copies the kept examples' JPEG bytes to files and writes the split's index; returns count."""
  for wnid in classes:
    tf.io.gfile.makedirs(os.path.join(root, split, wnid))
  table, class_names = tf.constant(table), tf.constant(classes)

  def relabel(example):
    return example["image"], tf.gather(table, example["label"])

  def write(k, jpeg, label):
    path = tf.strings.join([
        split, "/", tf.gather(class_names, label), "/",
        tf.strings.as_string(k, width=7, fill="0"), ".JPEG"])
    with tf.control_dependencies([tf.io.write_file(root + "/" + path, jpeg)]):
      return tf.identity(path), label

  kept = source.map(relabel, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda _, l: l >= 0)
  written = kept.enumerate().map(
      lambda k, ex: write(k, *ex), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  lines = []
  for path, label in written.as_numpy_iterator():
    lines.append(f"{path.decode()}\t{label}\n")
    if len(lines) % 10_000 == 0:
      logging.info("%s: %d images written", split, len(lines))
  with tf.io.gfile.GFile(os.path.join(root, f"{split}.tsv"), "w") as f:
    f.write("".join(lines))
  return len(lines)


def prepare(data_dir: str | None, manual_dir: str | None = None,
            imagenet2012_dir: str | None = None) -> str:
  """Writes ImageNet-100 under dataset_dir(data_dir) and returns that folder."""
  builder = tfds.builder("imagenet2012", data_dir=imagenet2012_dir or data_dir)
  if not builder.is_prepared():
    if manual_dir is None:
      raise ValueError(
          f"imagenet2012 is not prepared in {builder.data_dir}: pass --manual_dir, the folder "
          "holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, so tfds can prepare it")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  classes = wnids()
  table = _label_table(builder.info.features["label"].names, classes)
  root = dataset_dir(data_dir)
  counts = {}
  for split in SPLITS:
    source = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
    counts[split] = _write_split(source, root, split, table, classes)
    logging.info("%s: %d images in %s", split, counts[split], root)
  metadata = {"name": NAME, "version": VERSION, "source": f"imagenet2012/{builder.version}",
              "wnids": classes, "num_examples": counts}
  with tf.io.gfile.GFile(os.path.join(root, METADATA), "w") as f:
    json.dump(metadata, f, indent=2)
  return root


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--data_dir", help="tfds data dir that receives imagenet100 (default: tfds' default)")
  parser.add_argument(
      "--manual_dir", help="folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; "
      "needed only when imagenet2012 is not prepared yet")
  parser.add_argument(
      "--imagenet2012_dir", help="tfds data dir holding (or to receive) imagenet2012, e.g. a "
      "shared bucket (default: --data_dir)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  root = prepare(args.data_dir, args.manual_dir, args.imagenet2012_dir)
  print(f"ImageNet-100 written to {root}")


if __name__ == "__main__":
  main()
