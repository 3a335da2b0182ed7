"""DeiT's image transforms in TensorFlow, for tf.data (docs/method.md, "Data and sampling").

Train: random resized crop (bicubic) -> horizontal flip -> RandAugment -> random erasing, the
order of timm's `create_transform` that DeiT uses, whose normalisation (before the erasing)
happens on the devices instead (`datasets.normalize`). Eval: resize the shorter side to
size / crop_ratio (bicubic) and centre-crop. RandAugment is timm's `rand-m9-mstd0.5-inc1`,
written out by hand: tensorflow-addons, which held the usual TF versions of these ops, is dead.

Every random op is stateless and takes a seed of shape [2], so a transform gives the same result
eagerly and inside tf.data, on any host, for any number of parallel calls. Images are uint8
[H, W, C] throughout, as they are PIL images in timm until ToTensor; ops round and clip to uint8
where PIL would.

Colour ops reproduce PIL's results exactly (the tests compare with PIL). Known difference from
timm: geometric RandAugment ops (rotate, shear, translate) interpolate bilinearly where timm uses
bicubic, because ImageProjectiveTransform has no bicubic mode.
"""

from collections.abc import Callable
import math

import tensorflow as tf

from hetscale_jax.datasets import IMAGENET_MEAN, IMAGENET_STD
# The noisy magnitude is clipped to [0, MAX_LEVEL].
from hetscale_jax.datasets import RANDAUGMENT_MAX_MAGNITUDE as MAX_LEVEL

# timm fills the area uncovered by geometric ops with the dataset mean in 0..255.
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """[num, 2] independent seeds from one seed of shape [2]."""
  return tf.random.experimental.stateless_split(seed, num)


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval, maxval)


def _uniform_int(seed, maxval):
  """An int32 in [0, maxval)."""
  return tf.random.stateless_uniform((), seed, 0, maxval, dtype=tf.int32)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips float pixels in 0..255 to uint8, as PIL stores them."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# ---------------------------------------------------------------------------------------------
# Crops and flips.


def random_resized_crop_window(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params: (top, left, crop_height, crop_width).

  Ten candidate (area, aspect) pairs are drawn at once and the first that fits is taken, which
  is what torchvision's loop does; if none fits, the whole image clamped to the ratio range,
  centred.
  """
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  s_area, s_ratio, s_top, s_left = tf.unstack(split_seed(seed, 4))
  area = tf.cast(height * width, tf.float32)
  target = area * _uniform(s_area, scale[0], scale[1], (attempts,))
  aspect = tf.exp(_uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), (attempts,)))
  ws = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)

  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  in_ratio = w_f / h_f
  fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  crop_h = tf.where(found, hs[first], fallback_h)
  crop_w = tf.where(found, ws[first], fallback_w)
  top = tf.where(found, _uniform_int(s_top, height - crop_h + 1), (height - crop_h) // 2)
  left = tf.where(found, _uniform_int(s_left, width - crop_w + 1), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def _resize_bicubic(image, height, width):
  # PIL (used by timm) low-pass filters when it shrinks; antialias=True does the same.
  return to_uint8(tf.image.resize(image, tf.stack([height, width]), "bicubic", antialias=True))


def random_resized_crop(image: tf.Tensor, seed, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """uint8 [H, W, C] -> uint8 [size, size, C]: a random crop resized bicubically."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_window(shape[0], shape[1], seed, scale, ratio)
  crop = tf.image.crop_to_bounding_box(image, top, left, h, w)
  return tf.ensure_shape(_resize_bicubic(crop, size, size), (size, size, image.shape[-1]))


def decode_and_random_resized_crop(jpeg: tf.Tensor, seed, size: int, scale=(0.08, 1.0),
                                   ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """JPEG bytes -> uint8 [size, size, 3], decoding only the crop (the costly part at 224 px)."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  top, left, h, w = random_resized_crop_window(shape[0], shape[1], seed, scale, ratio)
  crop = tf.image.decode_and_crop_jpeg(jpeg, tf.stack([top, left, h, w]), channels=3)
  return tf.ensure_shape(_resize_bicubic(crop, size, size), (size, size, 3))


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
  """Left-right flip with probability 1/2."""
  image = tf.convert_to_tensor(image)
  # cond, not where: where would reverse every image and then select, twice the memory traffic.
  return tf.cond(_uniform(seed) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def random_translate(image: tf.Tensor, seed, max_shift: int) -> tf.Tensor:
  """Shifts by up to max_shift pixels along each axis, filling with zeros (digits' background)."""
  h, w, c = image.shape
  padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
  offset = tf.random.stateless_uniform((2,), seed, 0, 2 * max_shift + 1, dtype=tf.int32)
  return tf.slice(padded, tf.concat([offset, [0]], 0), [h, w, c])


def resize_center_crop(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
  """torchvision Resize(int(size / crop_ratio)) + CenterCrop(size), bicubic: DeiT's eval."""
  resize = int(size / crop_ratio)
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  # The shorter side becomes `resize`, the longer one int(resize * long / short).
  new_h = tf.where(h <= w, resize, tf.cast(resize * h / w, tf.int32))
  new_w = tf.where(h <= w, tf.cast(resize * w / h, tf.int32), resize)
  resized = _resize_bicubic(image, new_h, new_w)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  crop = tf.image.crop_to_bounding_box(resized, top, left, size, size)
  return tf.ensure_shape(crop, (size, size, image.shape[-1]))


# ---------------------------------------------------------------------------------------------
# RandAugment ops: uint8 [H, W, 3] in and out, one argument each (as produced by the level
# functions below), written after PIL's ImageOps / ImageEnhance.


def _grayscale(image):
  """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 [H, W, 1]."""
  x = tf.cast(image, tf.int32)
  return (x[..., :1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 32768) // 65536


def _blend(degenerate, image, factor):
  """PIL's Image.blend: degenerate + factor (image - degenerate), clipped, truncated."""
  d = tf.cast(degenerate, tf.float32)
  x = tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0.0, 255.0), tf.uint8)


def autocontrast(image: tf.Tensor, _=None) -> tf.Tensor:
  """Per channel, stretches [min, max] to [0, 255]; a flat channel is left as it is."""
  lo = tf.cast(tf.reduce_min(image, axis=(0, 1)), tf.float64)
  hi = tf.cast(tf.reduce_max(image, axis=(0, 1)), tf.float64)
  # PIL's lookup table, in float64 as PIL's Python computes it (float32 is off by one at times).
  levels = tf.range(256, dtype=tf.float64)[:, None]
  scale = tf.math.divide_no_nan(tf.constant(255.0, tf.float64), hi - lo)
  stretched = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  return _apply_luts(image, tf.cast(tf.where(hi > lo, stretched, levels), tf.uint8))


def _apply_luts(image, luts):
  """Maps channel c of a uint8 image through luts[:, c], a [256, C] table."""
  channels = image.shape[-1]
  index = tf.cast(image, tf.int32) * channels + tf.range(channels)
  return tf.gather(tf.reshape(luts, [-1]), index)


def _equalize_lut(channel):
  """PIL's equalize lookup table [256] for one uint8 channel [H, W]."""
  hist = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  # PIL leaves out the brightest level's count, so a single-level channel stays unchanged.
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
  return tf.where(step > 0, tf.clip_by_value(lut, 0, 255), tf.range(256))


def equalize(image: tf.Tensor, _=None) -> tf.Tensor:
  """Per-channel histogram equalisation, PIL's ImageOps.equalize."""
  luts = tf.stack([_equalize_lut(image[..., c]) for c in range(image.shape[-1])], 1)
  return _apply_luts(image, tf.cast(luts, tf.uint8))


def invert(image: tf.Tensor, _=None) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` (0..8) most significant bits of every pixel."""
  mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts every pixel >= threshold (256: none)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x >= tf.cast(threshold, tf.int32), 255 - x, x), tf.uint8)


def solarize_add(image: tf.Tensor, addition, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` to every pixel < threshold, saturating at 255."""
  x = tf.cast(image, tf.int32)
  added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation: blends with the grey image (0: grey, 1: unchanged)."""
  gray = tf.broadcast_to(_grayscale(image), tf.shape(image))
  return _blend(gray, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with a flat image at the rounded mean grey level (0: flat, 1: unchanged)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float32)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with black (0: black, 1: unchanged)."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with PIL's SMOOTH-filtered image (0: smooth, 1: unchanged); borders stay sharp."""
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(tf.floor(smooth + 0.5), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix, fill=FILL) -> tf.Tensor:
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)): output pixel (x, y) takes the input at
  (a x + b y + c, d x + e y + f); uncovered pixels get `fill`. Bilinear.
  """
  a, b, c, d, e, f = [tf.cast(m, tf.float32) for m in matrix]
  # PIL maps pixel centres (i + 0.5); ImageProjectiveTransform maps integer indices.
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  # The op fills with one scalar; shifting by the fill colour makes that scalar 0.
  fill = tf.constant(fill, tf.float32)
  x = tf.cast(image, tf.float32) - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return to_uint8(out + fill)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Counter-clockwise about the image centre, as PIL's Image.rotate."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2, shape[0] / 2
  theta = -tf.cast(degrees, tf.float32) * (math.pi / 180)
  cos, sin = tf.cos(theta), tf.sin(theta)
  return affine(image, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def shear_x(image: tf.Tensor, factor) -> tf.Tensor:
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(image: tf.Tensor, factor) -> tf.Tensor:
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0))


def translate_x(image: tf.Tensor, fraction) -> tf.Tensor:
  """Samples `fraction` of the width to the right, i.e. moves the content left for > 0."""
  pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image: tf.Tensor, fraction) -> tf.Tensor:
  pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


# Level -> argument, timm's "increasing" variants: a larger level is always a stronger change.
# `sign` is timm's random negation (+1 or -1) for the ops that have one.


def _no_arg(level, sign):
  del level, sign


def _enhance_arg(level, sign):
  return 1.0 + sign * level / MAX_LEVEL * 0.9


RAND_AUGMENT_OPS: dict[str, tuple[Callable, Callable]] = {
    "AutoContrast": (autocontrast, _no_arg),
    "Equalize": (equalize, _no_arg),
    "Invert": (invert, _no_arg),
    "Rotate": (rotate, lambda level, sign: sign * level / MAX_LEVEL * 30.0),
    "PosterizeIncreasing": (
        posterize, lambda level, sign: 4 - tf.cast(level / MAX_LEVEL * 4, tf.int32)),
    "SolarizeIncreasing": (
        solarize, lambda level, sign: 256 - tf.cast(level / MAX_LEVEL * 256, tf.int32)),
    "SolarizeAdd": (solarize_add, lambda level, sign: tf.cast(level / MAX_LEVEL * 110, tf.int32)),
    "ColorIncreasing": (color, _enhance_arg),
    "ContrastIncreasing": (contrast, _enhance_arg),
    "BrightnessIncreasing": (brightness, _enhance_arg),
    "SharpnessIncreasing": (sharpness, _enhance_arg),
    "ShearX": (shear_x, lambda level, sign: sign * level / MAX_LEVEL * 0.3),
    "ShearY": (shear_y, lambda level, sign: sign * level / MAX_LEVEL * 0.3),
    "TranslateXRel": (translate_x, lambda level, sign: sign * level / MAX_LEVEL * 0.45),
    "TranslateYRel": (translate_y, lambda level, sign: sign * level / MAX_LEVEL * 0.45),
}


def apply_op(name: str, image: tf.Tensor, level, sign=1.0) -> tf.Tensor:
  """RandAugment op `name` at magnitude `level` (0..10)."""
  op, level_to_arg = RAND_AUGMENT_OPS[name]
  return op(image, level_to_arg(tf.cast(level, tf.float32), tf.cast(sign, tf.float32)))


def _rand_augment_layer(image, seed, magnitude, magnitude_std, prob):
  s_op, s_apply, s_level, s_sign = tf.unstack(split_seed(seed, 4))
  level = magnitude + magnitude_std * tf.random.stateless_normal((), s_level)
  level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
  sign = tf.where(_uniform(s_sign) < 0.5, 1.0, -1.0)
  branches = [lambda name=name: apply_op(name, image, level, sign) for name in RAND_AUGMENT_OPS]
  op = _uniform_int(s_op, len(branches))
  # cond, not where: a skipped op costs nothing.
  return tf.cond(_uniform(s_apply) < prob, lambda: tf.switch_case(op, branches), lambda: image)


def rand_augment(image: tf.Tensor, seed, num_layers: int, magnitude: float,
                 magnitude_std: float, prob: float = 0.5) -> tf.Tensor:
  """timm's RandAugment: `num_layers` ops drawn with replacement, each applied with probability
  `prob` at magnitude N(magnitude, magnitude_std) clipped to [0, 10].
  """
  image = tf.convert_to_tensor(image)  # Eager tf.cond returns a skipped input as it is.
  for layer_seed in tf.unstack(split_seed(seed, num_layers)):
    image = _rand_augment_layer(image, layer_seed, magnitude, magnitude_std, prob)
  return image


def random_erasing(image: tf.Tensor, seed, probability: float, scale=(0.02, 1 / 3),
                   ratio=(0.3, 1 / 0.3), attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing(mode="pixel") on a uint8 RGB image: with `probability`, one rectangle
  of `scale` of the area and aspect in `ratio` is replaced by noise that ImageNet's
  normalisation turns into N(0, 1), up to pixel rounding and clipping.
  """
  s_apply, s_area, s_ratio, s_top, s_left, s_noise = tf.unstack(split_seed(seed, 6))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  area = tf.cast(height * width, tf.float32)
  target = area * _uniform(s_area, scale[0], scale[1], (attempts,))
  aspect = tf.exp(_uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), (attempts,)))
  hs = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (hs < height) & (ws < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = hs[first], ws[first]
  # When no candidate fits nothing is erased; the max only keeps the draw well defined.
  top = _uniform_int(s_top, tf.maximum(height - h + 1, 1))
  left = _uniform_int(s_left, tf.maximum(width - w + 1, 1))

  def erase():
    # timm erases the normalised image with N(0, 1) noise. The image is still uint8 here, so
    # the noise is drawn as pixels, 255 (mean + std z), rounded and clipped to 0..255: once
    # normalised it is N(0, 1) on a grid of 1 / (255 std), cut about two standard deviations
    # out. Erasing in float32 would be exact, but every batch would then cross to the devices
    # at four times the bytes. Noise for the rectangle only, and only when erasing: drawing
    # it is costly per pixel.
    z = tf.random.stateless_normal(tf.stack([h, w, len(IMAGENET_MEAN)]), s_noise)
    noise = to_uint8(255.0 * (tf.constant(IMAGENET_MEAN) + tf.constant(IMAGENET_STD) * z))
    noise = tf.pad(noise, [[top, height - top - h], [left, width - left - w], [0, 0]])
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return tf.where(inside, noise, image)

  apply = (_uniform(s_apply) < probability) & tf.reduce_any(fits)
  return tf.cond(apply, erase, lambda: tf.convert_to_tensor(image))


# ---------------------------------------------------------------------------------------------
# The composed DeiT transforms.


def deit_train(image: tf.Tensor, seed, *, size: int, crop_scale_min: float, hflip: bool,
               randaugment_layers: int, randaugment_magnitude: float, randaugment_mstd: float,
               random_erasing_prob: float) -> tf.Tensor:
  """uint8 [H, W, 3] or JPEG bytes -> uint8 [size, size, 3]."""
  s_crop, s_flip, s_ra, s_erase = tf.unstack(split_seed(seed, 4))
  if image.dtype == tf.string:
    x = decode_and_random_resized_crop(image, s_crop, size, (crop_scale_min, 1.0))
  else:
    x = random_resized_crop(image, s_crop, size, (crop_scale_min, 1.0))
  if hflip:
    x = random_flip(x, s_flip)
  if randaugment_layers:
    x = rand_augment(x, s_ra, randaugment_layers, randaugment_magnitude, randaugment_mstd)
  if random_erasing_prob:
    x = random_erasing(x, s_erase, random_erasing_prob)
  return x


def deit_eval(image: tf.Tensor, *, size: int, crop_ratio: float) -> tf.Tensor:
  """uint8 [H, W, 3] or JPEG bytes -> uint8 [size, size, 3]."""
  if image.dtype == tf.string:
    image = tf.io.decode_jpeg(image, channels=3)
  return resize_center_crop(image, size, crop_ratio)
