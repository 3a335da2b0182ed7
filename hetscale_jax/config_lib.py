"""Every config field, its default, and the checks run before any work.

Config files start from `base_config()` and override fields; `validate(config)` rejects an
unknown field or a bad value with an error naming the field and what is allowed.
"""

import difflib

import ml_collections
from ml_collections import config_dict

from hetscale_jax import grow, layers, splitting
from hetscale_jax import datasets
from hetscale_jax.models import deit

DTYPES = ("float32", "bfloat16")
BUDGET_WEIGHTS = ("equal", "lr")


def base_config(dataset: str = "digits") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = datasets.default_data_config(dataset)

  c.model = ml_collections.ConfigDict()
  c.model.variant = "S"                       # "Ti", "S" or "B": widths not overridden below
  c.model.patch_size = 16
  c.model.width = config_dict.placeholder(int)
  c.model.depth = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.head_dim = config_dict.placeholder(object)  # int, or one per block: the bottlenecks
  c.model.mlp_dim = config_dict.placeholder(object)   # int, or one per block
  c.model.drop_path_rate = 0.1
  c.model.dtype = "float32"                   # activations; params are always float32
  c.model.unit_activation = "gelu"

  c.batch_size = 512                          # global, over all devices and hosts
  c.num_epochs = 300
  c.train_steps = 0                           # 0: num_epochs of steps; else this many, the lr
                                              #   schedule compressed to them (compute matching)
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 5e-4                      # at batch 512; scaled linearly with batch_size
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.label_smoothing = 0.1
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8                   # 0 disables mixup
  c.mixup.cutmix_alpha = 1.0                  # 0 disables cutmix
  c.mixup.switch_prob = 0.5                   # chance of cutmix when both are on
  c.mixup.prob = 1.0                          # chance a batch is mixed at all

  c.growth = ml_collections.ConfigDict()
  c.growth.enabled = False
  c.growth.epochs = ()                        # growth events, at these (fractional) epochs
  c.growth.budget_per_event = 0               # parameters added per event, or ...
  c.growth.target_params = 0                  # ... total parameters after the last event
  c.growth.layers = deit.GROWABLE_LAYERS      # eligible layer kinds
  c.growth.budget_weights = "equal"           # target's share per event: "equal", or "lr" (lr at
                                              #   the event / peak lr, as released)
  c.growth.rule = "splitting"                 # how neurons are scored (grow.RULES)
  c.growth.unit = "gated"                     # what they get (grow.UNITS): "gated" (the paper's
                                              #   text) or "linear" (the released code)
  c.growth.allocation = "global"              # one ranking, or "by_kind" quotas (grow.ALLOCATIONS)
  c.growth.min_candidates = 60                # by_kind: candidates a layer needs to qualify
  c.growth.max_layers_per_kind = 3            # by_kind: layers of one kind grown per event
  c.growth.mode = "exact"                     # gated units: "exact", a = 0; "split", |a| = 1
  c.growth.unit_scale = 1.0                   # |r . x~| of a gated unit, relative to input scale
  c.growth.threshold = 0.0                    # splitting, row_sum: grow only scores below this
  c.growth.max_layer_fraction = 0.25          # cap on a layer's neurons grown per event
  c.growth.slots = "events"                   # unit slots sized at each event, or all before
                                              # training: "schedule" (grow.SLOTS)
  c.growth.probe_batches = 1                  # training batches the splitting matrices average
  c.growth.num_iters = splitting.DEFAULT_NUM_ITERS   # Lanczos iterations
  c.growth.method = "collected"               # or "streamed" (memory of one training step)
  c.growth.measure_split = False              # also measure the split-mode loss change (growth_event)
  c.growth.split_check_scale = 0.1            # ... at this unit_scale, where 2nd order holds
  c.growth.unit_only_steps = 0                # also train each event's new units alone, base
                                              #   frozen, this many steps on a copy (unit_only.py)
  c.growth.held_aside_batches = 1             # test batches the two measures above are taken on
  c.growth.perturbation = 0.0                 # the noise floor: right after the first event,
                                              #   every parameter p -> p (1 + this N(0, 1))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                             # devices over which params/opt state are sharded
  c.log_every_steps = 50
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.compilation_cache_dir = "~/.cache/hetscale_jax/xla"  # "" disables the persistent cache
  return c


class ConfigError(ValueError):
  pass


def _unknown_field(prefix: str, key: str, group) -> ConfigError:
  close = difflib.get_close_matches(key, list(group.keys()), n=1)
  suggestion = f"did you mean {prefix}.{close[0]}? " if close else ""
  return ConfigError(f"unknown config field {prefix}.{key}; {suggestion}fields of {prefix}: "
                     f"{sorted(group.keys())}")


def check_field_path(config, path: str) -> None:
  """ConfigError naming the first key of the dotted `path` ("growth.rule") that is no field of
  `config` (what a command-line override may set), with the closest field."""
  group, prefix = config, "config"
  for key in path.split("."):
    if not isinstance(group, ml_collections.ConfigDict):
      raise ConfigError(f"{prefix} is a value, not a group of fields: {prefix}.{key} does not exist")
    if key not in group:
      raise _unknown_field(prefix, key, group)
    group, prefix = group[key], f"{prefix}.{key}"


def _check_fields(config, reference, prefix="config"):
  """Sets every field of `config` on `reference`, a locked base_config: the locked ConfigDict
  refuses a field it lacks and a value of another type."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if name == "config.data":  # its fields depend on the dataset: datasets checks them
      continue
    try:
      if isinstance(value, ml_collections.ConfigDict) and isinstance(
          reference.get(key), ml_collections.ConfigDict):
        _check_fields(value, reference[key], name)
      else:
        reference[key] = value
    except (AttributeError, KeyError):
      raise _unknown_field(prefix, key, reference) from None
    except TypeError as e:
      raise ConfigError(f"{name}={value!r} is invalid: {e}") from None


def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def validate(config) -> None:
  """Raises ConfigError naming the first bad field. Pure: no I/O, no devices.

  What needs the data (model.patch_size dividing the image size) is checked by
  `check_against_data` once the dataset's metadata is read, still before any work.
  """
  reference = base_config()
  reference.lock()
  _check_fields(config, reference)
  m, g, o = config.model, config.growth, config.optim
  _require(m.variant in deit.VARIANTS, "model.variant", m.variant,
           f"choose one of {list(deit.VARIANTS)}")
  _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"choose one of {DTYPES}")
  _require(m.unit_activation in layers.ACTIVATIONS, "model.unit_activation", m.unit_activation,
           f"choose one of {sorted(layers.ACTIVATIONS)}")
  _require(m.patch_size > 0, "model.patch_size", m.patch_size, "must be > 0")
  for field in ("width", "depth", "num_heads"):
    _require(m[field] is None or m[field] > 0, f"model.{field}", m[field], "must be > 0 (or unset)")
  depth = m.depth or deit.VARIANTS[m.variant]["depth"]
  for field in ("head_dim", "mlp_dim"):
    try:
      if m[field] is not None:
        deit.per_block(m[field], depth, f"config.model.{field}")
    except ValueError as e:
      raise ConfigError(f"{e}: give a positive int, or one per block ({depth} blocks)") from None
  _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", m.drop_path_rate, "must be in [0, 1)")
  _require(config.batch_size > 0, "batch_size", config.batch_size, "must be > 0")
  _require(config.num_epochs > 0, "num_epochs", config.num_epochs, "must be > 0")
  _require(config.train_steps >= 0, "train_steps", config.train_steps,
           "must be >= 0 (0: num_epochs of steps)")
  # Growth events are placed in epochs, which train_steps does not compress.
  _require(config.train_steps == 0 or not g.enabled, "train_steps", config.train_steps,
           "is for static runs (compute matching): set it to 0 or growth.enabled to False")
  _require(o.base_lr > 0, "optim.base_lr", o.base_lr, "must be > 0")
  _require(0 <= o.warmup_epochs < config.num_epochs, "optim.warmup_epochs", o.warmup_epochs,
           f"must be in [0, num_epochs={config.num_epochs})")
  _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _require(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing, "must be in [0, 1)")
  for field in ("mixup_alpha", "cutmix_alpha"):
    _require(config.mixup[field] >= 0, f"mixup.{field}", config.mixup[field], "must be >= 0 (0 disables)")
  for field in ("switch_prob", "prob"):
    _require(0 <= config.mixup[field] <= 1, f"mixup.{field}", config.mixup[field], "must be in [0, 1]")
  _require(config.mesh.fsdp >= 1, "mesh.fsdp", config.mesh.fsdp, "must be >= 1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[field] >= 1, field, config[field], "must be >= 1")
  _require(config.eval_every_epochs > 0, "eval_every_epochs", config.eval_every_epochs, "must be > 0")
  try:
    datasets.validate_data_config(config.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  if not g.enabled:
    return
  _require(len(g.epochs) > 0, "growth.epochs", g.epochs, "list at least one epoch when growth.enabled")
  _require(all(0 <= e < config.num_epochs for e in g.epochs), "growth.epochs", g.epochs,
           f"every growth epoch must be in [0, num_epochs={config.num_epochs})")
  _require(list(g.epochs) == sorted(set(g.epochs)), "growth.epochs", g.epochs, "must be increasing")
  _require(g.budget_per_event >= 0, "growth.budget_per_event", g.budget_per_event,
           "must be >= 0 parameters")
  _require(g.target_params >= 0, "growth.target_params", g.target_params, "must be >= 0 parameters")
  _require((g.budget_per_event > 0) != (g.target_params > 0), "growth.budget_per_event",
           g.budget_per_event, "set exactly one of growth.budget_per_event and growth.target_params")
  _require(len(g.layers) > 0 and set(g.layers) <= set(deit.GROWABLE_LAYERS), "growth.layers",
           g.layers, f"choose a non-empty subset of {deit.GROWABLE_LAYERS}")
  _require(g.budget_weights in BUDGET_WEIGHTS, "growth.budget_weights", g.budget_weights,
           f"choose one of {BUDGET_WEIGHTS}")
  _require(g.budget_weights == "equal" or g.target_params > 0, "growth.budget_weights",
           g.budget_weights, "weights share growth.target_params: set it, or use 'equal'")
  _require(g.rule in grow.RULES, "growth.rule", g.rule, f"choose one of {grow.RULES}")
  _require(g.unit in grow.UNITS, "growth.unit", g.unit, f"choose one of {grow.UNITS}")
  _require(g.allocation in grow.ALLOCATIONS, "growth.allocation", g.allocation,
           f"choose one of {grow.ALLOCATIONS}")
  _require(g.min_candidates >= 1, "growth.min_candidates", g.min_candidates, "must be >= 1")
  _require(g.max_layers_per_kind >= 1, "growth.max_layers_per_kind", g.max_layers_per_kind,
           "must be >= 1")
  _require(g.mode in grow.MODES, "growth.mode", g.mode, f"choose one of {grow.MODES}")
  _require(g.mode == "exact" or g.unit == "gated", "growth.mode", g.mode,
           "'split' needs growth.unit='gated' (linear units are exact only)")
  _require(g.unit_scale > 0, "growth.unit_scale", g.unit_scale, "must be > 0")
  _require(g.split_check_scale > 0, "growth.split_check_scale", g.split_check_scale, "must be > 0")
  _require(g.unit_only_steps >= 0, "growth.unit_only_steps", g.unit_only_steps, "must be >= 0 (0: none)")
  _require(g.held_aside_batches >= 1, "growth.held_aside_batches", g.held_aside_batches, "must be >= 1")
  _require(g.perturbation >= 0, "growth.perturbation", g.perturbation, "must be >= 0 (0: none)")
  _require(0 < g.max_layer_fraction <= 1, "growth.max_layer_fraction", g.max_layer_fraction,
           "must be in (0, 1]")
  _require(g.slots in grow.SLOTS, "growth.slots", g.slots, f"choose one of {grow.SLOTS}")
  _require(g.probe_batches >= 1, "growth.probe_batches", g.probe_batches, "must be >= 1")
  _require(g.num_iters >= 1, "growth.num_iters", g.num_iters, "must be >= 1")
  _require(g.method in splitting.METHODS, "growth.method", g.method,
           f"choose one of {splitting.METHODS}")


def check_against_data(config, info: datasets.DatasetInfo) -> None:
  size = info.image_shape[0]
  _require(size % config.model.patch_size == 0, "model.patch_size", config.model.patch_size,
           f"must divide the {info.name} image size {size}")
  held_aside = config.growth.held_aside_batches * config.batch_size
  _require(held_aside <= info.num_eval, "growth.held_aside_batches", config.growth.held_aside_batches,
           f"times batch_size must be at most the {info.num_eval} {info.name} test images")
  try:
    datasets.check_batch_fits(info.name, info.num_train, config.batch_size)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


def check_against_devices(config, num_devices: int) -> None:
  """What the mesh needs: checked once the devices are known, before any work.

  Every process holds the same number of devices, so a batch split evenly over the devices
  is also split evenly over the processes.
  """
  _require(num_devices % config.mesh.fsdp == 0, "mesh.fsdp", config.mesh.fsdp,
           f"must divide the number of devices ({num_devices})")
  _require(config.batch_size % num_devices == 0, "batch_size", config.batch_size,
           f"must be a multiple of the number of devices ({num_devices}), since every device "
           f"takes an equal part of each batch")


def small_config(dataset: str) -> ml_collections.ConfigDict:
  """The shared recipe of the small configs that train on a CPU in minutes (configs/default.py,
  configs/study_mnist5k.py): a DeiT-Ti of width 64, depth 4 and 4 heads, batch 64, no
  drop-path or mixing (a few thousand small images), growth capped at half a layer per event.
  Each config sets its patch size, bottleneck widths, schedule and growth events."""
  c = base_config(dataset)
  c.model.variant = "Ti"
  c.model.width = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.drop_path_rate = 0.0
  c.batch_size = 64
  c.optim.base_lr = 3e-2          # at batch 512: peak lr 3.75e-3 at batch 64
  c.mixup.prob = 0.0              # a few thousand tiny images: mixing only slows learning here
  c.growth.enabled = True
  c.growth.max_layer_fraction = 0.5
  c.growth.min_candidates = 1     # layers of a few dozen neurons: any candidate qualifies
  c.growth.num_iters = 12
  return c


# The mechanisms and baselines that studies and the paper configs pick by name. A grown
# variant sets the growth settings below on the config's reduced model; a static one trains a
# model that never grows: the reduced start, the full widths, or conventional scaling
# (head_dim and mlp_dim in the full model's ratio, sized like the grown models).
GROWN_VARIANTS = {
    "splitting": dict(rule="splitting", unit="gated", allocation="global"),   # the paper's text
    # The classic splitting step: the paper's text, its units taken at |a| = 1 downhill, at the
    # unit scale where the second-order prediction holds (growth.split_check_scale's default),
    # so that the loss drops at once by about the predicted amount.
    "split": dict(rule="splitting", unit="gated", allocation="global", mode="split",
                  unit_scale=0.1),
    # The study's resolution: the paper's text with every parameter perturbed by 1e-3 of itself
    # right after the first event (same picks); its paired difference to splitting is what so
    # small a change alone moves.
    "noise_floor": dict(rule="splitting", unit="gated", allocation="global", perturbation=1e-3),
    "authors": dict(rule="row_sum", unit="linear", allocation="by_kind"),     # the released code
    "grad_norm": dict(rule="grad_norm", unit="linear", allocation="global"),
    "random": dict(rule="random", unit="gated", allocation="global"),
    "random_linear": dict(rule="random", unit="linear", allocation="global"),
    "uniform": dict(rule="uniform", unit="gated", allocation="global"),
    "first_order": dict(rule="first_order", unit="gated", allocation="global"),
}
STATIC_VARIANTS = ("static_reduced", "static_full", "static_uniform")
VARIANTS = tuple(GROWN_VARIANTS) + STATIC_VARIANTS
# "splitting@0.3": a variant at growth.unit_scale 0.3. Only the gated variants that leave the
# scale to the config take one (split fixes its own; a linear unit has no scale).
SCALE_MARK = "@"


def takes_unit_scale(variant: str) -> bool:
  settings = GROWN_VARIANTS.get(variant, {})
  return settings.get("unit") == "gated" and "unit_scale" not in settings


def scaled(variant: str, unit_scale: float) -> str:
  """The name of `variant` at growth.unit_scale `unit_scale`: "splitting@0.3"."""
  return f"{variant}{SCALE_MARK}{unit_scale:g}"


def parse_variant(name: str) -> tuple[str, float | None]:
  """"splitting@0.3" -> ("splitting", 0.3); "splitting" -> ("splitting", None), the config's
  unit scale; a compute-matched static (flops_matched) -> (its static variant, None).
  ValueError for an unknown variant or one that takes no unit scale."""
  if (matched := flops_matched_parts(name)) is not None:
    return matched[0], None
  variant, mark, scale = name.partition(SCALE_MARK)
  if variant not in VARIANTS:
    raise ValueError(f"variant {name!r}: choose one of {VARIANTS}, optionally {SCALE_MARK}<unit "
                     "scale>")
  if not mark:
    return variant, None
  if not takes_unit_scale(variant) or not is_positive_number(scale):
    takes = [v for v in GROWN_VARIANTS if takes_unit_scale(v)]
    raise ValueError(f"variant {name!r}: only {takes} take a unit scale, a number > 0 "
                     f"(e.g. splitting{SCALE_MARK}0.3)")
  return variant, float(scale)


def is_positive_number(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


def is_grown(name: str) -> bool:
  return parse_variant(name)[0] in GROWN_VARIANTS


def at_scale_of(name: str, variant: str) -> str:
  """`variant` at the unit scale that `name` names (if any): the variant `name` pairs with."""
  unit_scale = parse_variant(name)[1]
  return variant if unit_scale is None else scaled(variant, unit_scale)


def random_counterpart(name: str) -> str | None:
  """The variant that grows units as `name` does (kind, mode, scale) but on random neurons:
  what its choice of neurons is measured against. The allocation is part of that choice
  (authors' by_kind quotas), so random_linear is authors' counterpart. None for a random or
  static variant, and where none matches (split: no random variant takes the split step)."""
  variant, _ = parse_variant(name)
  settings = GROWN_VARIANTS.get(variant)
  if settings is None or settings["rule"] == "random":
    return None
  how = lambda s: {k: v for k, v in s.items() if k not in ("rule", "allocation")}
  for other, other_settings in GROWN_VARIANTS.items():
    if other_settings["rule"] == "random" and how(other_settings) == how(settings):
      return at_scale_of(name, other)
  return None


# "static_uniform@flops:splitting": static_uniform trained for the training FLOPs of the
# splitting run of the same seed (compute_matched_steps), its schedule compressed to them.
FLOPS_MARK = "@flops:"
COMPUTE_MATCHED_STATICS = ("static_full", "static_uniform")


def flops_matched(static: str, grown: str) -> str:
  """The name of `static` trained on the training FLOPs of `grown`: "static_uniform@flops:
  splitting"."""
  return f"{static}{FLOPS_MARK}{grown}"


def flops_matched_parts(name: str) -> tuple[str, str] | None:
  """"static_uniform@flops:splitting@0.3" -> ("static_uniform", "splitting@0.3"); None for a
  name without FLOPS_MARK. ValueError if either part is not what compute matching takes."""
  static, mark, grown = name.partition(FLOPS_MARK)
  if not mark:
    return None
  try:
    grown_ok = is_grown(grown)
  except ValueError:  # not a variant at all
    grown_ok = False
  if static not in COMPUTE_MATCHED_STATICS or not grown_ok:
    raise ValueError(f"variant {name!r}: compute matching trains one of "
                     f"{COMPUTE_MATCHED_STATICS} on a grown variant's FLOPs, e.g. "
                     f"{flops_matched('static_uniform', 'splitting')}")
  return static, grown


def compute_matched_steps(grown_train_flops: float, static_step_flops: float) -> int:
  """The steps a static model whose train step costs `static_step_flops` trains on a grown
  run's training FLOPs (its summary's compute["train_flops"]): the most whose FLOPs do not
  exceed them, at least one."""
  return max(int(grown_train_flops // static_step_flops), 1)


def grown_params(config, sizes: dict) -> int:
  """Parameters of the config's grown model: growth.target_params, or the start plus every
  event's budget. `sizes` as deit.param_count takes them (train.model_sizes)."""
  g = config.growth
  return g.target_params or (deit.param_count(config.model.variant, **sizes)
                             + len(g.epochs) * g.budget_per_event)


def apply_variant(config, name: str, sizes: dict) -> ml_collections.ConfigDict:
  """A copy of `config` (reduced widths, growth enabled) run as the variant `name` (VARIANTS,
  or parse_variant's "variant@unit_scale"); `sizes` are the config's model sizes as
  deit.param_count takes them (train.model_sizes)."""
  variant, unit_scale = parse_variant(name)
  c = config.copy_and_resolve_references()
  if variant in GROWN_VARIANTS:
    c.growth.update(GROWN_VARIANTS[variant])
    if unit_scale is not None:
      c.growth.unit_scale = unit_scale
    return c
  c.growth.enabled = False
  if variant == "static_full":
    c.model.head_dim, c.model.mlp_dim = None, None  # deit.create's defaults: the full widths
  elif variant == "static_uniform":
    c.model.head_dim, c.model.mlp_dim = deit.uniform_widths(
        grown_params(config, sizes), config.model.variant, **sizes)
  return c


# The released code's reduced DeiT-S (q/k/v 192 wide, i.e. 6 heads of 32, MLP 768: 11.07M
# parameters with 100 classes) and its schedule: 9 events, after epochs 50, 80, ..., 290 of
# 300, each adding parameters in proportion to the learning rate, up to the 19.4M its README
# reports.
PAPER_REDUCED = dict(head_dim=32, mlp_dim=768)
PAPER_TARGET_PARAMS = 19_400_000
PAPER_GROWTH_EPOCHS = tuple(float(e) for e in range(50, 300, 30))


def paper_config(variant, dataset, num_classes, img_size, *, patch_size):
  """The shared recipe of the paper configs; `variant` (VARIANTS) picks the mechanism or a
  baseline."""
  c = base_config(dataset)
  c.model.variant = "S"
  c.model.patch_size = patch_size
  c.model.drop_path_rate = 0.1
  c.batch_size = 1024
  c.num_epochs = 300
  c.model.dtype = "bfloat16"
  c.log_every_steps = 100
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 2000
  c.model.head_dim, c.model.mlp_dim = PAPER_REDUCED["head_dim"], PAPER_REDUCED["mlp_dim"]
  c.growth.enabled = True
  c.growth.epochs = PAPER_GROWTH_EPOCHS
  c.growth.target_params = PAPER_TARGET_PARAMS
  c.growth.budget_weights = "lr"
  c.growth.probe_batches = 4
  sizes = dict(num_classes=num_classes, img_size=img_size, patch_size=patch_size, **PAPER_REDUCED)
  return apply_variant(c, variant, sizes)
