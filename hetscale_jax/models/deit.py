"""DeiT (Touvron et al. 2021) whose linear layers can grow, with per-block bottlenecks.

The architecture is timm's `deit_{tiny,small,base}_patch16_224` (non-distilled). The qkv, proj,
fc1 and fc2 layers are GrowableDense, and each block may have its own attention head dimension
and MLP width: the reduced, heterogeneous start of "Beyond Uniform Scaling". Parameter names
mirror timm's so that `params_from_timm` is a renaming plus transposes.

    model = create("S", num_classes=100, head_dim=32, mlp_dim=[768] * 6 + [1536] * 6)
    logits = model.apply(variables, images_nhwc, train=False)
"""

from collections.abc import Mapping, Sequence
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hetscale_jax.layers import GrowableDense, activation_fn

VARIANTS = {
    "Ti": dict(width=192, depth=12, num_heads=3),
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
}
# The layer kinds that carry units: every GrowableDense of a block.
GROWABLE_LAYERS = ("qkv", "proj", "fc1", "fc2")
OVERRIDES = ("width", "depth", "num_heads", "head_dim", "mlp_dim", "patch_size",
             "drop_path_rate", "dtype", "unit_activation")

# timm's trunc_normal_(std=.02) cuts at +-2 in absolute terms, i.e. at 100 std.
_trunc_normal = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
# The patch conv keeps PyTorch's default kernel init in timm: U(+-1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _at_least_float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v per head; q, k, v and the result are
  [batch, tokens, heads, head_dim]."""
  if q.dtype == jnp.float64:
    # jax.nn.dot_product_attention rounds the softmax to float32 whatever the inputs, and
    # float64 models exist to check the growth maths to float64 rounding.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1]**-0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
  # jax's maintained attention keeps the logits and the softmax in float32 for bfloat16
  # activations, whose softmax normalisation would lose too much.
  return jax.nn.dot_product_attention(q, k, v)


def _growable_dense(dtype, unit_activation: str):
  """The qkv/proj/fc1/fc2 layer: GrowableDense with DeiT's init."""
  return functools.partial(GrowableDense, dtype=dtype, kernel_init=_trunc_normal,
                           unit_activation=unit_activation)


class Attention(nn.Module):
  """timm's multi-head self-attention, with heads * head_dim free of the model width."""

  num_heads: int
  head_dim: int
  dtype: Any
  unit_activation: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = _growable_dense(self.dtype, self.unit_activation)
    b, n, d = x.shape
    qkv = dense(3 * self.num_heads * self.head_dim, name="qkv")(x)
    # timm's layout: the qkv features are (3, heads, head_dim), in that order.
    q, k, v = jnp.unstack(qkv.reshape(b, n, 3, self.num_heads, self.head_dim), axis=2)
    out = _attention(q, k, v).reshape(b, n, -1)
    return dense(d, name="proj")(out)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any
  unit_activation: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = _growable_dense(self.dtype, self.unit_activation)
    y = dense(self.mlp_dim, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    return dense(x.shape[-1], name="fc2")(y)


class Block(nn.Module):
  """Pre-LN transformer block with stochastic depth on both residual branches."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  drop_path: float
  dtype: Any
  unit_activation: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    # Drop-path drops a whole branch per sample: dropout with one mask value per sample.
    drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    y = norm(name="norm1")(x)
    y = Attention(self.num_heads, self.head_dim, self.dtype, self.unit_activation,
                  name="attn")(y)
    x = x + drop_path(y)
    y = norm(name="norm2")(x)
    y = Mlp(self.mlp_dim, self.dtype, self.unit_activation, name="mlp")(y)
    return x + drop_path(y)


class VisionTransformer(nn.Module):
  """DeiT classifier on the class token. Build it with `create`, which checks the arguments.

  `head_dim` and `mlp_dim` hold one value per block.
  """

  num_classes: int
  img_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  head_dim: tuple[int, ...]
  mlp_dim: tuple[int, ...]
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  unit_activation: str = "gelu"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, img_size, img_size, C] -> logits [B, num_classes], at least float32."""
    if images.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"images are {images.shape[1:3]}, the model expects "
                       f"{(self.img_size, self.img_size)} (NHWC)")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=_conv_init, name="patch_embed")(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)

    cls = self.param("cls_token", _trunc_normal, (1, 1, d), jnp.float32)
    pos = self.param("pos_embed", _trunc_normal, (1, h * w + 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(x.dtype)

    # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last.
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    for i in range(self.depth):
      x = Block(self.num_heads, self.head_dim[i], self.mlp_dim[i], float(rates[i]), self.dtype,
                self.unit_activation, name=f"blocks_{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_trunc_normal,
                      name="head")(x[:, 0])
    # Losses and metrics want at least float32, also when the activations are bfloat16.
    return _at_least_float32(logits)


def per_block(value: int | Sequence[int], depth: int, name: str) -> tuple[int, ...]:
  """An int for every block, or one int per block, as a tuple of `depth` ints (ValueError
  naming `name` otherwise)."""
  if np.ndim(value) == 0:
    value = (value,) * depth
  if len(value) != depth:
    raise ValueError(f"{name} has {len(value)} entries, expected one per block (depth {depth})")
  if not all(isinstance(v, (int, np.integer)) and v > 0 for v in value):
    raise ValueError(f"{name}={value!r}: every entry must be a positive int")
  return tuple(int(v) for v in value)


def architecture(variant: str, **overrides) -> dict[str, Any]:
  """DeiT-`variant`'s settings with `overrides` (see OVERRIDES) applied; head_dim and mlp_dim
  resolved to one int per block."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeiT variant {variant!r}; choose one of {list(VARIANTS)}")
  unknown = sorted(set(overrides) - set(OVERRIDES))
  if unknown:
    raise ValueError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDES)}")
  cfg = dict(patch_size=16, drop_path_rate=0.0, dtype=jnp.float32, unit_activation="gelu",
             head_dim=None, mlp_dim=None, **VARIANTS[variant])
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  width, depth, num_heads = cfg["width"], cfg["depth"], cfg["num_heads"]
  if cfg["head_dim"] is None:
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}; "
                       "give head_dim")
    cfg["head_dim"] = width // num_heads
  if cfg["mlp_dim"] is None:
    cfg["mlp_dim"] = 4 * width
  cfg["head_dim"] = per_block(cfg["head_dim"], depth, "head_dim")
  cfg["mlp_dim"] = per_block(cfg["mlp_dim"], depth, "mlp_dim")
  return cfg


def create(variant: str, num_classes: int = 1000, img_size: int = 224,
           **overrides) -> VisionTransformer:
  """DeiT-`variant` ("Ti", "S" or "B"), with any of OVERRIDES changed.

  head_dim (default width // num_heads) and mlp_dim (default 4 * width) are an int for every
  block or a sequence with one entry per block; qkv has 3 * num_heads * head_dim outputs.
  dtype is the activation dtype; parameters are always float32.
  """
  cfg = architecture(variant, **overrides)
  if img_size % cfg["patch_size"]:
    raise ValueError(f"img_size {img_size} is not divisible by patch_size {cfg['patch_size']}")
  cfg["dtype"] = jnp.dtype(cfg["dtype"])
  if not jnp.issubdtype(cfg["dtype"], jnp.floating):
    raise ValueError(f"dtype must be a floating type, got {cfg['dtype']}")
  activation_fn(cfg["unit_activation"])  # Fails now on an unknown name, not at the first growth.
  return VisionTransformer(num_classes=num_classes, img_size=img_size, **cfg)


def param_count(variant: str = "S", *, num_classes: int, img_size: int, channels: int = 3,
                **overrides) -> int:
  """Parameters of `create(variant, num_classes, img_size, **overrides)` on `channels`-channel
  images, in closed form: searching widths by it costs no tracing (tests check it against
  the model)."""
  cfg = architecture(variant, **overrides)
  width, heads, patch = cfg["width"], cfg["num_heads"], cfg["patch_size"]
  tokens = (img_size // patch) ** 2 + 1
  total = patch ** 2 * channels * width + width + width + tokens * width
  for h, m in zip(cfg["head_dim"], cfg["mlp_dim"]):
    inner = heads * h
    total += 4 * width + 3 * inner * (width + 1) + inner * width + width + 2 * width * m + m + width
  return total + 2 * width + width * num_classes + num_classes


def uniform_widths(target_params: int, variant: str = "S", **sizes) -> tuple[int, int]:
  """(head_dim, mlp_dim) in the full model's mlp/head ratio, alike in every block, whose
  parameter count (param_count(variant, **sizes)) is closest to target_params: the
  conventional-scaling baseline. `sizes` may override width, depth and num_heads too."""
  base = architecture(variant, **{k: v for k, v in sizes.items() if k in OVERRIDES})
  full_head = base["width"] // base["num_heads"]
  ratio = 4 * base["width"] // full_head
  sizes = {k: v for k, v in sizes.items() if k not in ("head_dim", "mlp_dim")}
  return min(((h, ratio * h) for h in range(1, 2 * full_head + 1)),
             key=lambda hm: abs(param_count(variant, head_dim=hm[0], mlp_dim=hm[1], **sizes)
                                - target_params))


def params_from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """timm DeiT state dict (names -> arrays) -> params of the `create`d model.

  Linear weights [out, in] become kernels [in, out], the patch conv [D, C, P, P] becomes
  [P, P, C, D], LayerNorm weights become scales. The widths come with the arrays; the number of
  heads does not, so give it to `create`. Raises ValueError listing unknown and missing names
  (e.g. the dist_token of a distilled DeiT).
  """
  arrays = {name: np.asarray(value) for name, value in state_dict.items()}
  blocks = {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in arrays) if m}
  depth = max(blocks, default=-1) + 1
  # (timm module, our path) of every LayerNorm and Linear.
  norms = [("norm", ("norm",))]
  linears = [("head", ("head",))]
  for i in range(depth):
    norms += [(f"blocks.{i}.{n}", (f"blocks_{i}", n)) for n in ("norm1", "norm2")]
    linears += [(f"blocks.{i}.{m}", (f"blocks_{i}", *m.split(".")))
                for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]

  expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
  expected |= {f"{module}.{p}" for module, _ in norms + linears for p in ("weight", "bias")}
  unknown, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
  if unknown or missing:
    raise ValueError(f"not a timm DeiT state dict: unknown keys {unknown}, missing keys {missing}")

  params = {
      "cls_token": arrays["cls_token"],
      "pos_embed": arrays["pos_embed"],
      "patch_embed": {"kernel": arrays["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                      "bias": arrays["patch_embed.proj.bias"]},
  }

  def put(path, leaves):
    node = params
    for key in path:
      node = node.setdefault(key, {})
    node.update(leaves)

  for module, path in norms:
    put(path, {"scale": arrays[f"{module}.weight"], "bias": arrays[f"{module}.bias"]})
  for module, path in linears:
    put(path, {"kernel": arrays[f"{module}.weight"].T, "bias": arrays[f"{module}.bias"]})
  return params
