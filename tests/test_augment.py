"""DeiT transforms: each op on known inputs, PIL parity of the colour ops, determinism."""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from hetscale_jax import augment

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
# A smooth photo-like image with a narrow range, so autocontrast and equalize have work to do.
SMOOTH = np.asarray(Image.fromarray(RNG.integers(40, 200, (6, 6, 3), dtype=np.uint8)).resize(
    (40, 30), Image.BICUBIC))


def seed(i: int) -> tf.Tensor:
  return tf.constant([7, i], tf.int64)


def test_to_uint8_rounds_and_clips():
  out = augment.to_uint8(tf.constant([-3.0, 0.4, 0.6, 254.5, 300.0]))
  np.testing.assert_array_equal(out, [0, 0, 1, 254, 255])


def test_random_flip_is_identity_or_mirror_and_both_occur():
  flipped = 0
  for i in range(40):
    out = augment.random_flip(NOISE, seed(i)).numpy()
    is_mirror = np.array_equal(out, NOISE[:, ::-1])
    assert is_mirror or np.array_equal(out, NOISE)
    flipped += is_mirror
  assert 8 <= flipped <= 32


def test_random_resized_crop_window_bounds():
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  for i in range(100):
    top, left, h, w = [int(v) for v in augment.random_resized_crop_window(60, 90, seed(i))]
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    # Rounding h and w to pixels moves area and aspect a little past their sampled ranges.
    assert scale[0] * 0.8 <= h * w / (60 * 90) <= scale[1]
    assert ratio[0] * 0.8 <= w / h <= ratio[1] * 1.25


def test_random_resized_crop_window_falls_back_to_clamped_centre_crop():
  # No area above the image's fits, so torchvision's fallback applies: the full height, the
  # width clamped to the largest ratio, centred.
  window = augment.random_resized_crop_window(100, 400, seed(0), scale=(2.0, 3.0))
  assert [int(v) for v in window] == [0, (400 - 133) // 2, 100, 133]


def test_random_resized_crop_of_full_window_is_identity():
  out = augment.random_resized_crop(NOISE[:24, :24], seed(3), 24, scale=(1.0, 1.0),
                                    ratio=(1.0, 1.0))
  np.testing.assert_array_equal(out, NOISE[:24, :24])


def test_decode_and_crop_matches_crop_of_decoded_image():
  # Without chroma subsampling, decoding a crop and cropping the decoded image agree.
  jpeg = tf.io.encode_jpeg(NOISE, quality=95, chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(jpeg, channels=3)
  for i in range(5):
    a = augment.decode_and_random_resized_crop(jpeg, seed(i), 16)
    b = augment.random_resized_crop(decoded, seed(i), 16)
    assert a.shape == (16, 16, 3) and a.dtype == tf.uint8
    np.testing.assert_array_equal(a, b)


def test_random_translate_shifts_by_at_most_one_pixel_with_zero_fill():
  image = RNG.random((8, 8, 1)).astype(np.float32) + 1.0
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  shifts = set()
  for i in range(60):
    out = augment.random_translate(image, seed(i), 1).numpy()
    match = [(dy, dx) for dy in range(3) for dx in range(3)
             if np.array_equal(out, padded[dy:dy + 8, dx:dx + 8])]
    assert len(match) == 1
    shifts.add(match[0])
  assert len(shifts) == 9


def test_resize_center_crop_at_native_resolution_is_a_centre_slice():
  image = RNG.integers(0, 256, (256, 320, 3), dtype=np.uint8)
  out = augment.resize_center_crop(image, 224, 0.875)  # Resize(256): the image is already so.
  np.testing.assert_array_equal(out, image[16:240, 48:272])


def test_resize_center_crop_shape():
  assert augment.resize_center_crop(NOISE, 16, 0.875).shape == (16, 16, 3)


WHITE = np.full((40, 50, 3), 255, np.uint8)  # Noise is white in all three channels only rarely.


def test_random_erasing_rectangle_bounds():
  areas = []
  for i in range(50):
    out = augment.random_erasing(WHITE, seed(i), 1.0).numpy()
    assert out.dtype == np.uint8
    rows, cols = np.nonzero((out != 255).any(-1))
    if rows.size:  # A rectangle: its bounding box is fully erased.
      h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
      assert h * w == rows.size and h < 40 and w < 50
      areas.append(h * w / 2000)
  assert len(areas) >= 40
  assert 0.02 * 0.7 <= min(areas) and max(areas) <= 1 / 3 * 1.3


def test_random_erasing_probability():
  image = WHITE[:16, :16]
  assert all(
      np.array_equal(augment.random_erasing(image, seed(i), 0.0), image) for i in range(10))
  erased = [not np.array_equal(augment.random_erasing(image, seed(i), 0.25), image)
            for i in range(200)]
  assert 25 <= sum(erased) <= 75


def _normal_cdf(x):
  return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_random_erasing_noise_normalizes_to_standard_normal_clipped_to_pixels():
  """Erased pixels, normalised as DeiT does, follow N(0, 1) rounded to pixel levels: pixel 0
  takes the mass below 0.5, pixel 255 the mass above 254.5."""
  image = np.full((64, 64, 3), 255, np.uint8)
  erased = []
  for i in range(30):
    out = augment.random_erasing(image, seed(i), 1.0).numpy()
    erased.append(out[(out != 255).any(-1)])
  pixels = np.concatenate(erased).astype(np.float64)
  assert len(pixels) > 10_000
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  normalized = (pixels / 255 - mean) / std
  for c in range(3):
    # Thresholds between pixel levels, where rounding moves no mass across.
    for level in (0.5, round(255 * (mean[c] - std[c])) + 0.5, round(255 * mean[c]) + 0.5,
                  round(255 * (mean[c] + std[c])) + 0.5, 254.5):
      expected = _normal_cdf((level / 255 - mean[c]) / std[c])
      assert abs(np.mean(pixels[:, c] < level) - expected) < 0.015, (c, level)
    assert abs(normalized[:, c].mean()) < 0.05 and 0.9 < normalized[:, c].std() < 1.0


# RandAugment ops.

IDENTITY_AT_ZERO = ["Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
def test_op_is_identity_at_magnitude_zero(name):
  for sign in (1.0, -1.0):
    np.testing.assert_array_equal(augment.apply_op(name, NOISE, 0.0, sign), NOISE)


@pytest.mark.parametrize("name", sorted(augment.RAND_AUGMENT_OPS))
def test_op_keeps_shape_and_dtype_and_changes_image_at_full_magnitude(name):
  out = augment.apply_op(name, SMOOTH, augment.MAX_LEVEL, -1.0)
  assert out.shape == SMOOTH.shape and out.dtype == tf.uint8
  assert not np.array_equal(out, SMOOTH)


def test_invert():
  np.testing.assert_array_equal(augment.invert(NOISE), 255 - NOISE)


def test_solarize_thresholds():
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = augment.solarize(ramp, 128).numpy()
  np.testing.assert_array_equal(out[ramp < 128], ramp[ramp < 128])
  np.testing.assert_array_equal(out[ramp >= 128], 255 - ramp[ramp >= 128])
  np.testing.assert_array_equal(augment.apply_op("SolarizeIncreasing", ramp, 10.0), 255 - ramp)
  out = augment.solarize_add(ramp, 100).numpy()
  np.testing.assert_array_equal(out[ramp >= 128], ramp[ramp >= 128])
  np.testing.assert_array_equal(out[ramp < 128], np.minimum(ramp[ramp < 128] + 100, 255))


def test_posterize_bits():
  np.testing.assert_array_equal(augment.posterize(NOISE, 8), NOISE)
  np.testing.assert_array_equal(augment.posterize(NOISE, 4), NOISE & 0xF0)
  np.testing.assert_array_equal(augment.posterize(NOISE, 0), np.zeros_like(NOISE))
  # timm's increasing posterize keeps 4 bits at magnitude 0 and 0 bits at magnitude 10.
  np.testing.assert_array_equal(augment.apply_op("PosterizeIncreasing", NOISE, 0.0),
                                NOISE & 0xF0)


def test_rotate_by_right_angles():
  square = NOISE[:24, :24]
  np.testing.assert_array_equal(augment.rotate(square, 90.0), np.rot90(square))
  np.testing.assert_array_equal(augment.rotate(square, -90.0), np.rot90(square, -1))
  np.testing.assert_array_equal(augment.rotate(square, 180.0), square[::-1, ::-1])
  # Rotate's largest angle is 30 degrees: corners move out and are filled with the mean colour.
  out = augment.apply_op("Rotate", square, augment.MAX_LEVEL).numpy()
  np.testing.assert_array_equal(out[0, 0], augment.FILL)


def test_translate_moves_content_and_fills():
  out = augment.translate_x(NOISE, 0.25).numpy()  # 8 of 32 columns.
  np.testing.assert_array_equal(out[:, :24], NOISE[:, 8:])
  np.testing.assert_array_equal(out[:, 24:], np.broadcast_to(augment.FILL, (24, 8, 3)))
  out = augment.translate_y(NOISE, -0.25).numpy()  # 6 of 24 rows, the other way.
  np.testing.assert_array_equal(out[6:], NOISE[:-6])


PIL_REFERENCE = [
    ("autocontrast", lambda x: augment.autocontrast(x), ImageOps.autocontrast),
    ("equalize", lambda x: augment.equalize(x), ImageOps.equalize),
    ("posterize", lambda x: augment.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
] + [
    (f"{op}{f}", lambda x, op=op, f=f: getattr(augment, op)(x, f),
     lambda p, op=op, f=f: getattr(ImageEnhance, op.capitalize())(p).enhance(f))
    for op in ("color", "contrast", "brightness", "sharpness") for f in (0.1, 0.6, 1.9)
]


@pytest.mark.parametrize("name,ours,pil", PIL_REFERENCE, ids=[r[0] for r in PIL_REFERENCE])
def test_colour_ops_match_pil(name, ours, pil):
  del name
  np.testing.assert_array_equal(ours(SMOOTH), np.asarray(pil(Image.fromarray(SMOOTH))))


def test_affine_matches_pil_away_from_the_border():
  pil = Image.fromarray(SMOOTH).transform(
      (40, 30), Image.AFFINE, (1, 0.2, 0, 0, 1, 0), resample=Image.BILINEAR,
      fillcolor=augment.FILL)
  ours = augment.shear_x(SMOOTH, 0.2).numpy().astype(int)
  # Both sample at pixel centres; they differ only in how bilinear weights meet the fill.
  np.testing.assert_allclose(ours[2:-2, 2:-8], np.asarray(pil).astype(int)[2:-2, 2:-8], atol=1)


def test_rand_augment_without_layers_is_identity():
  np.testing.assert_array_equal(augment.rand_augment(NOISE, seed(0), 0, 9.0, 0.5), NOISE)


def test_rand_augment_is_seeded():
  outs = [augment.rand_augment(SMOOTH, seed(i), 2, 9.0, 0.5).numpy() for i in range(12)]
  again = augment.rand_augment(SMOOTH, seed(0), 2, 9.0, 0.5).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert len({o.tobytes() for o in outs}) >= 6
  # Each of the two ops is skipped with probability 1/2, so some images come out unchanged.
  assert any(np.array_equal(o, SMOOTH) for o in outs + [
      augment.rand_augment(SMOOTH, seed(i), 2, 9.0, 0.5).numpy() for i in range(12, 40)])


DEIT_KWARGS = dict(size=24, crop_scale_min=0.08, hflip=True, randaugment_layers=2,
                   randaugment_magnitude=9.0, randaugment_mstd=0.5, random_erasing_prob=0.25)


def test_deit_train_eager_equals_tf_data():
  jpeg = tf.io.encode_jpeg(SMOOTH)
  seeds = tf.stack([seed(i) for i in range(6)])
  for raw in (tf.constant(SMOOTH), jpeg):
    eager = [augment.deit_train(raw, s, **DEIT_KWARGS).numpy() for s in seeds]
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda s, raw=raw: augment.deit_train(raw, s, **DEIT_KWARGS), num_parallel_calls=3)
    for a, b in zip(eager, ds.as_numpy_iterator()):
      assert a.shape == (24, 24, 3) and a.dtype == np.uint8
      np.testing.assert_array_equal(a, b)
    assert len({e.tobytes() for e in eager}) == len(eager)


def test_deit_eval_eager_equals_tf_data_and_jpeg_matches_array():
  jpeg = tf.io.encode_jpeg(SMOOTH, quality=100)
  eager = augment.deit_eval(jpeg, size=16, crop_ratio=0.875).numpy()
  in_data = next(tf.data.Dataset.from_tensors(jpeg).map(
      lambda j: augment.deit_eval(j, size=16, crop_ratio=0.875)).as_numpy_iterator())
  np.testing.assert_array_equal(eager, in_data)
  from_array = augment.deit_eval(tf.io.decode_jpeg(jpeg), size=16, crop_ratio=0.875)
  np.testing.assert_array_equal(eager, from_array)
