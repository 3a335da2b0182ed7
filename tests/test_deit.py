"""DeiT: sizes, argument checks, timm equivalence (against a NumPy reference), drop-path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetscale_jax import grow
from hetscale_jax.models import deit

# A small DeiT for the numerical tests.
SMALL = dict(width=32, depth=2, num_heads=2, patch_size=4)
IMG, CLASSES = 16, 10


def _small(**overrides):
  return deit.create("Ti", num_classes=CLASSES, img_size=IMG, **{**SMALL, **overrides})


def _abstract_params(model, img_size):
  images = jnp.zeros((1, img_size, img_size, 3))
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _shapes(model, img_size):
  return jax.tree.map(lambda x: x.shape, _abstract_params(model, img_size))


@pytest.fixture
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("variant, count", [
    ("Ti", 5_717_416), ("S", 22_050_664), ("B", 86_567_656)])
def test_parameter_count_matches_timm(variant, count):
  params = _abstract_params(deit.create(variant), 224)
  assert sum(x.size for x in jax.tree.leaves(params)) == count


def test_reduced_heterogeneous_shapes():
  head_dim, mlp_dim = [16, 8, 32], [64, 96, 128]
  model = deit.create("Ti", num_classes=10, img_size=32, depth=3, head_dim=head_dim,
                      mlp_dim=mlp_dim)
  shapes = _shapes(model, 32)
  assert shapes["pos_embed"] == (1, 5, 192)
  assert shapes["patch_embed"]["kernel"] == (16, 16, 3, 192)
  assert shapes["head"]["kernel"] == (192, 10)
  for i, (hd, m) in enumerate(zip(head_dim, mlp_dim)):
    block = shapes[f"blocks_{i}"]
    assert block["attn"]["qkv"]["kernel"] == (192, 3 * 3 * hd)
    assert block["attn"]["proj"]["kernel"] == (3 * hd, 192)
    assert block["mlp"]["fc1"]["kernel"] == (192, m)
    assert block["mlp"]["fc2"]["kernel"] == (m, 192)
  assert "blocks_3" not in shapes

  uniform = _shapes(deit.create("S", depth=2, head_dim=16, mlp_dim=512), 224)
  assert uniform["blocks_1"]["attn"]["qkv"]["kernel"] == (384, 3 * 6 * 16)
  assert uniform["blocks_1"]["mlp"]["fc2"]["kernel"] == (512, 384)


@pytest.mark.parametrize("args, overrides, match", [
    (("L",), {}, r"unknown DeiT variant 'L'.*'Ti', 'S', 'B'"),
    (("S",), {"heads": 4}, r"unknown override\(s\) \['heads'\].*num_heads"),
    (("S",), {"depth": 3, "mlp_dim": [1, 2]}, r"mlp_dim has 2 entries.*depth 3"),
    (("S",), {"head_dim": [8] * 13}, r"head_dim has 13 entries.*depth 12"),
    (("S", 1000, 100), {}, r"img_size 100 is not divisible by patch_size 16"),
    (("S",), {"num_heads": 5}, r"width 384 is not divisible by num_heads 5"),
    (("S",), {"unit_activation": "relu6"}, r"unknown unit activation 'relu6'"),
    (("S",), {"dtype": jnp.int32}, r"dtype must be a floating type"),
])
def test_create_rejects_bad_arguments(args, overrides, match):
  with pytest.raises(ValueError, match=match):
    deit.create(*args, **overrides)


def test_apply_rejects_wrong_image_size():
  model = _small()
  with pytest.raises(ValueError, match=r"images are \(8, 8\), the model expects \(16, 16\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------------------------------------
# Attention against the explicit formula: einsum logits, softmax in at least float32.


def _einsum_attention(q, k, v):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1]**-0.5, k)
  probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _exact_attention(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("head_dim", [16, 48])  # 1/sqrt(head_dim) exact in binary, and not
def test_attention_matches_einsum_formula(head_dim):
  q, k, v = np.random.default_rng(head_dim).standard_normal((3, 4, 17, 3, head_dim))
  f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  expected = np.asarray(_einsum_attention(*f32))
  np.testing.assert_allclose(deit._attention(*f32), expected, rtol=0,
                             atol=1e-6 * np.abs(expected).max())

  # bfloat16: as close to the exact result as the formula, which rounds the logits to
  # bfloat16 before its float32 softmax, and within a few bfloat16 steps.
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  exact = _exact_attention(*bf16)
  out = deit._attention(*bf16)
  assert out.dtype == jnp.bfloat16
  error = np.asarray(out, np.float64) - exact
  formula_error = np.asarray(_einsum_attention(*bf16), np.float64) - exact
  assert np.sqrt(np.mean(error**2)) <= np.sqrt(np.mean(formula_error**2))
  assert np.abs(error).max() <= 2**-6 * np.abs(exact).max()


# ---------------------------------------------------------------------------------------------
# timm equivalence. The reference below follows timm's VisionTransformer.forward on torch-layout
# weights, written independently of the Flax model.


def _random_timm_state_dict(rng, width, depth, head_dims, mlp_dims, num_heads, patch, channels,
                            num_patches, num_classes):
  def normal(*shape, scale=0.3):
    return scale * rng.standard_normal(shape)

  sd = {
      "cls_token": normal(1, 1, width),
      "pos_embed": normal(1, num_patches + 1, width),
      "patch_embed.proj.weight": normal(width, channels, patch, patch, scale=0.2),
      "patch_embed.proj.bias": normal(width),
      "norm.weight": 1 + normal(width), "norm.bias": normal(width),
      "head.weight": normal(num_classes, width), "head.bias": normal(num_classes),
  }
  for i in range(depth):
    attn_dim = num_heads * head_dims[i]
    for name, (fan_out, fan_in) in {
        "attn.qkv": (3 * attn_dim, width), "attn.proj": (width, attn_dim),
        "mlp.fc1": (mlp_dims[i], width), "mlp.fc2": (width, mlp_dims[i])}.items():
      sd[f"blocks.{i}.{name}.weight"] = normal(fan_out, fan_in, scale=fan_in**-0.5)
      sd[f"blocks.{i}.{name}.bias"] = normal(fan_out, scale=0.1)
    for name in ("norm1", "norm2"):
      sd[f"blocks.{i}.{name}.weight"] = 1 + normal(width)
      sd[f"blocks.{i}.{name}.bias"] = normal(width)
  return sd


def _layer_norm(x, weight, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * weight + bias


def _linear(sd, name, x):
  return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


_erf = np.vectorize(math.erf)


def _timm_forward(sd, images_nchw, num_heads):
  """timm VisionTransformer (class token, no distillation) in NumPy."""
  w = sd["patch_embed.proj.weight"]
  d, _, p, _ = w.shape
  b, c, h, wd = images_nchw.shape
  patches = images_nchw.reshape(b, c, h // p, p, wd // p, p)
  x = np.einsum("bcyixj,dcij->bdyx", patches, w) + sd["patch_embed.proj.bias"][:, None, None]
  x = x.reshape(b, d, -1).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), x], axis=1) + sd["pos_embed"]
  n = x.shape[1]
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    blk = f"blocks.{i}"
    y = _layer_norm(x, sd[f"{blk}.norm1.weight"], sd[f"{blk}.norm1.bias"])
    qkv = _linear(sd, f"{blk}.attn.qkv", y)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    attn = (q * head_dim**-0.5) @ k.swapaxes(-2, -1)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, num_heads * head_dim)
    x = x + _linear(sd, f"{blk}.attn.proj", y)
    y = _linear(sd, f"{blk}.mlp.fc1", _layer_norm(x, sd[f"{blk}.norm2.weight"],
                                                   sd[f"{blk}.norm2.bias"]))
    y = 0.5 * y * (1 + _erf(y / np.sqrt(2)))
    x = x + _linear(sd, f"{blk}.mlp.fc2", y)
  x = _layer_norm(x, sd["norm.weight"], sd["norm.bias"])
  return _linear(sd, "head", x[:, 0])


@pytest.mark.parametrize("head_dim, mlp_dim", [(16, 128), ([8, 24], [40, 72])])
def test_params_from_timm_matches_reference(x64, head_dim, mlp_dim):
  rng = np.random.default_rng(0)
  head_dims, mlp_dims = np.broadcast_to(head_dim, 2), np.broadcast_to(mlp_dim, 2)
  sd = _random_timm_state_dict(rng, 32, 2, head_dims, mlp_dims, num_heads=2, patch=4,
                               channels=3, num_patches=16, num_classes=CLASSES)
  images = rng.standard_normal((3, 3, IMG, IMG))  # NCHW, as timm takes it

  model = _small(head_dim=head_dim, mlp_dim=mlp_dim, dtype=jnp.float64)
  params = deit.params_from_timm(sd)
  expected = _shapes(model, IMG)
  assert jax.tree.map(np.shape, params) == expected
  logits = model.apply({"params": params}, images.transpose(0, 2, 3, 1))

  assert logits.dtype == jnp.float64
  np.testing.assert_allclose(logits, _timm_forward(sd, images, num_heads=2), rtol=0, atol=1e-10)


def test_bfloat16_close_to_float32():
  rng = np.random.default_rng(1)
  sd = _random_timm_state_dict(rng, 32, 2, (16, 16), (128, 128), num_heads=2, patch=4,
                               channels=3, num_patches=16, num_classes=CLASSES)
  params = jax.tree.map(lambda a: a.astype(np.float32), deit.params_from_timm(sd))
  images = rng.standard_normal((4, IMG, IMG, 3)).astype(np.float32)

  f32 = _small().apply({"params": params}, images)
  bf16 = _small(dtype="bfloat16").apply({"params": params}, images)
  assert bf16.dtype == jnp.float32  # logits are upcast for the loss
  assert np.isfinite(bf16).all()
  np.testing.assert_allclose(bf16, f32, atol=0.05 * float(np.abs(f32).max()))


def test_params_from_timm_lists_unknown_and_missing_keys():
  sd = _random_timm_state_dict(np.random.default_rng(0), 8, 2, (4, 4), (8, 8), num_heads=2,
                               patch=4, channels=3, num_patches=4, num_classes=3)
  sd["dist_token"] = np.zeros((1, 1, 8))
  del sd["blocks.1.mlp.fc2.bias"], sd["head.weight"]
  with pytest.raises(ValueError, match=r"unknown keys \['dist_token'\], "
                     r"missing keys \['blocks.1.mlp.fc2.bias', 'head.weight'\]"):
    deit.params_from_timm(sd)


# ---------------------------------------------------------------------------------------------


def test_units_in_the_variables_are_applied():
  model = _small()
  images = jax.random.normal(jax.random.key(1), (2, IMG, IMG, 3))
  variables = model.init(jax.random.key(0), images)
  r = jax.random.normal(jax.random.key(2), (2, 32 + 1))
  place = lambda gain: grow.add_units(variables, {"blocks_0/mlp/fc1": ([3, 7], r, gain)})
  base = model.apply(variables, images)
  np.testing.assert_allclose(model.apply(place(jnp.zeros(2)), images), base, rtol=0, atol=1e-6)
  assert not np.allclose(model.apply(place(jnp.ones(2)), images), base)


def test_drop_path():
  # depth 2: the rates are [0, drop_path_rate], so only the second block is ever dropped.
  images = jax.random.normal(jax.random.key(1), (16, IMG, IMG, 3))
  model = _small(drop_path_rate=0.5)
  variables = model.init(jax.random.key(0), images)
  key = jax.random.key(3)

  def run(train, key=key, model=model):
    return model.apply(variables, images, train=train, rngs={"dropout": key})

  evaluated = run(False)
  np.testing.assert_array_equal(evaluated, model.apply(variables, images))
  trained = run(True)
  np.testing.assert_array_equal(trained, run(True))
  assert not np.allclose(trained, run(True, key=jax.random.key(4)))

  # Per sample: each image drops each branch of the second block or not; those that drop both
  # equal a depth-1 model.
  params = {k: v for k, v in variables["params"].items() if k != "blocks_1"}
  first_block_only = _small(depth=1).apply({"params": params}, images)
  dropped = np.isclose(trained, first_block_only, rtol=0, atol=1e-5).all(axis=-1)
  assert 0 < dropped.sum() < len(images)
  assert not np.isclose(evaluated, first_block_only, rtol=0, atol=1e-5).all(axis=-1).any()

  # drop_path_rate 1 removes the last block always.
  np.testing.assert_allclose(run(True, model=_small(drop_path_rate=1.0)), first_block_only,
                             rtol=0, atol=1e-5)
