"""Configs: every shipped config validates, bad values name their field, sizes are exact."""

import importlib.util
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetscale_jax import config_lib, datasets, growth_event, replicate, train
from hetscale_jax.models import deit

from conftest import CONFIG_DIR, load_config

def test_configs_build_and_validate_without_tensorflow():
  # A fresh interpreter: this one has long imported TensorFlow for the input pipelines.
  code = f"""
import importlib.util, pathlib, sys
from hetscale_jax import config_lib
for path in sorted(pathlib.Path({str(CONFIG_DIR)!r}).glob("*.py")):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_lib.validate(module.get_config())
heavy = {{"tensorflow", "tensorflow_datasets", "sklearn"}} & set(sys.modules)
assert not heavy, heavy
"""
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name, args", [("default", ()), ("tiny_test", ()), ("deit_s_in100", ()),
                                        ("deit_s_cifar100", ()), ("study_mnist5k", ()),
                                        ("study_mnist5k", ("late",))])
def test_shipped_configs_validate(name, args):
  config_lib.validate(load_config(name, *args))


def test_the_study_regimes_differ_only_in_their_growth_events():
  early, late = load_config("study_mnist5k"), load_config("study_mnist5k", "late")
  assert early.growth.epochs == (3.0, 6.0) and late.growth.epochs == (12.0, 18.0)
  late.growth.epochs = early.growth.epochs
  assert late.to_dict() == early.to_dict()
  with pytest.raises(ValueError, match="regime 'middle'"):
    load_config("study_mnist5k", "middle")


def test_variant_names_carry_a_unit_scale_where_the_unit_has_one():
  sizes = {}  # grown variants need no sizes
  config = load_config("study_mnist5k")
  scaled = config_lib.apply_variant(config, "noise_floor@0.3", sizes)
  assert scaled.growth.unit_scale == 0.3 and scaled.growth.perturbation == 1e-3
  assert config_lib.apply_variant(config, "noise_floor", sizes).growth.unit_scale == 1.0
  split = config_lib.apply_variant(config, "split", sizes)
  assert (split.growth.mode, split.growth.unit_scale, split.growth.rule) == ("split", 0.1, "splitting")
  assert config_lib.parse_variant("random@1") == ("random", 1.0)
  for bad in ("split@0.3", "authors@0.3", "splitting@0", "splitting@big", "splitting@-1"):
    with pytest.raises(ValueError, match=re.escape(f"variant {bad!r}: only [")):
      config_lib.parse_variant(bad)
  with pytest.raises(ValueError, match="variant 'best': choose one of"):
    config_lib.parse_variant("best")


def test_a_compute_matched_static_is_named_by_the_grown_run_it_matches():
  name = config_lib.flops_matched("static_uniform", "splitting@0.3")
  assert name == "static_uniform@flops:splitting@0.3"
  assert config_lib.flops_matched_parts(name) == ("static_uniform", "splitting@0.3")
  assert config_lib.parse_variant(name) == ("static_uniform", None)
  assert not config_lib.is_grown(name) and config_lib.random_counterpart(name) is None
  for bad in ("static_reduced@flops:splitting", "static_full@flops:static_uniform",
              "static_full@flops:best"):
    with pytest.raises(ValueError, match=re.escape(f"variant {bad!r}: compute matching trains")):
      config_lib.parse_variant(bad)
  variants = ["splitting", "authors", "static_uniform"]
  assert replicate.compute_matched_names(variants, ["authors"]) == ["static_uniform@flops:authors"]
  for matched_to, variants in ((["random"], variants), (["static_uniform"], variants),
                               (["splitting"], ["splitting", "static_reduced"])):
    with pytest.raises(ValueError, match="--compute_matched .* cannot be matched"):
      replicate.compute_matched_names(variants, matched_to)


@pytest.mark.parametrize("name, counterpart", [
    ("splitting", "random"), ("splitting@0.3", "random@0.3"), ("uniform", "random"),
    ("first_order@0.1", "random@0.1"), ("authors", "random_linear"),
    ("grad_norm", "random_linear"), ("split", None), ("noise_floor", None), ("random", None),
    ("random_linear", None), ("static_reduced", None)])
def test_a_rule_is_measured_against_random_neurons_grown_the_same_way(name, counterpart):
  assert config_lib.random_counterpart(name) == counterpart


@pytest.mark.parametrize("variant", config_lib.VARIANTS)
def test_paper_variants_validate(variant):
  config_lib.validate(load_config("deit_s_in100", variant))


def test_paper_configs_are_the_released_setting():
  """The released reduced DeiT-S (11,071,204 parameters with 100 classes), 9 events after
  epochs 50, 80, ..., 290 to 19.4M parameters, each event's share in proportion to the
  learning rate: the released ratios lr(e) / base_lr."""
  grown = load_config("deit_s_in100")
  reduced = deit.param_count("S", num_classes=100, img_size=224,
                             head_dim=grown.model.head_dim, mlp_dim=grown.model.mlp_dim)
  assert reduced == 11_071_204 and grown.growth.target_params == 19_400_000
  assert grown.growth.epochs == (50.0, 80.0, 110.0, 140.0, 170.0, 200.0, 230.0, 260.0, 290.0)
  steps_per_epoch = 123  # ImageNet-100's 126,689 training images at batch 1024
  schedule = train.learning_rate_schedule(grown, steps_per_epoch)
  steps = growth_event.event_steps(grown, steps_per_epoch)
  weights = train.event_weights(grown, schedule, steps)
  # The released ratios, to the difference of the two cosine schedules (timm's counts the
  # warm-up epochs into the cosine, optax's starts it after them).
  np.testing.assert_allclose(weights, [.94, .84, .71, .57, .41, .27, .15, .06, .03], atol=0.02)
  params, budgets = reduced, []
  for i in range(len(steps)):
    budgets.append(growth_event.event_budget(grown.growth, params, weights[i:]))
    params += budgets[-1]
  assert 0 <= grown.growth.target_params - params < len(steps)  # only rounding left over
  assert budgets == sorted(budgets, reverse=True)
  # The mechanisms, on one reduced start.
  for variant, (rule, unit, allocation) in {"splitting": ("splitting", "gated", "global"),
                                            "authors": ("row_sum", "linear", "by_kind")}.items():
    c = load_config("deit_s_in100", variant)
    assert (c.growth.rule, c.growth.unit, c.growth.allocation) == (rule, unit, allocation)
    assert (c.model.head_dim, c.model.mlp_dim) == (32, 768) and c.growth.enabled
  full = deit.param_count("S", num_classes=100, img_size=224)
  uniform = load_config("deit_s_in100", "static_uniform")
  same_size = deit.param_count("S", num_classes=100, img_size=224,
                               head_dim=uniform.model.head_dim, mlp_dim=uniform.model.mlp_dim)
  # The uniformly scaled baseline is within one head-dim step of the grown model's size.
  assert abs(same_size - grown.growth.target_params) < 0.02 * full
  assert not load_config("deit_s_in100", "static_full").growth.enabled


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(variant="Ti", depth=3, head_dim=(8, 16, 24), mlp_dim=(32, 64, 96), patch_size=4,
         img_size=16, num_classes=10, channels=1),
])
def test_closed_form_param_count_matches_the_model(overrides):
  variant = overrides.pop("variant", "S")
  sizes = dict(num_classes=overrides.pop("num_classes", 1000), img_size=overrides.pop("img_size", 224))
  channels = overrides.pop("channels", 3)
  model = deit.create(variant, **sizes, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, sizes["img_size"], sizes["img_size"], channels)))
  counted = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert deit.param_count(variant, channels=channels, **sizes, **overrides) == counted


@pytest.mark.parametrize("field, value, message", [
    ("model.variant", "XL", "config.model.variant='XL'"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("model.mlp_dim", (64, 64), "config.model.mlp_dim"),
    ("batch_size", 0, "config.batch_size=0"),
    ("train_steps", -1, "config.train_steps=-1"),
    ("train_steps", 100, "config.train_steps=100 is invalid: is for static runs"),
    ("optim.warmup_epochs", 50.0, "config.optim.warmup_epochs"),
    ("mixup.prob", 1.5, "config.mixup.prob"),
    ("growth.budget_per_event", -5, "config.growth.budget_per_event=-5"),
    ("growth.epochs", (8.0, 400.0), "config.growth.epochs"),
    ("growth.epochs", (16.0, 8.0), "must be increasing"),
    ("growth.rule", "best", "config.growth.rule='best'"),
    ("growth.layers", ("qkv", "head"), "config.growth.layers"),
    ("growth.method", "dense", "config.growth.method"),
    ("growth.unit", "wide", "config.growth.unit='wide'"),
    ("growth.allocation", "per_block", "config.growth.allocation='per_block'"),
    ("growth.min_candidates", 0, "config.growth.min_candidates=0"),
    ("growth.budget_weights", "steps", "config.growth.budget_weights='steps'"),
    ("growth.split_check_scale", 0.0, "config.growth.split_check_scale=0.0"),
    ("growth.perturbation", -1e-3, "config.growth.perturbation=-0.001"),
    ("growth.unit_only_steps", -1, "config.growth.unit_only_steps=-1"),
    ("growth.held_aside_batches", 0, "config.growth.held_aside_batches=0"),
    ("data.repeated_augmentation", 0, "config.data.repeated_augmentation"),
])
def test_bad_values_name_the_field(field, value, message):
  config = load_config("default")
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


@pytest.mark.parametrize("batch_size, fsdp, message", [
    (64, 3, "config.mesh.fsdp=3 is invalid: must divide the number of devices (8)"),
    (60, 1, "config.batch_size=60 is invalid: must be a multiple of the number of devices (8)"),
])
def test_mesh_needs_are_checked_against_the_devices(batch_size, fsdp, message):
  config = load_config("default")
  config.batch_size, config.mesh.fsdp = batch_size, fsdp
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.check_against_devices(config, 8)
  config.batch_size, config.mesh.fsdp = 64, 2
  config_lib.check_against_devices(config, 8)


def test_held_aside_batches_must_fit_the_test_set():
  config = load_config("study_mnist5k")  # batch 64, 1,000 test images: 15 batches fit
  info = datasets.DatasetInfo("mnist5k", 10, (28, 28, 1), num_train=5000, num_eval=1000)
  config.growth.held_aside_batches = 15
  config_lib.check_against_data(config, info)
  config.growth.held_aside_batches = 16
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.growth.held_aside_batches=16 is invalid: times batch_size must be at most the 1000 "
      "mnist5k test images")):
    config_lib.check_against_data(config, info)


def test_split_mode_needs_gated_units_and_lr_weights_a_target():
  config = load_config("default")
  config.growth.mode, config.growth.unit = "split", "linear"
  with pytest.raises(config_lib.ConfigError, match="'split' needs growth.unit='gated'"):
    config_lib.validate(config)
  config = load_config("study_mnist5k")  # a budget per event, no target
  config.growth.budget_weights = "lr"
  with pytest.raises(config_lib.ConfigError, match="set it, or use 'equal'"):
    config_lib.validate(config)


def test_both_budgets_or_neither_is_an_error():
  config = load_config("default")
  config.growth.budget_per_event = 1000
  with pytest.raises(config_lib.ConfigError, match="exactly one of growth.budget_per_event"):
    config_lib.validate(config)


def test_unknown_field_is_named_with_the_allowed_ones():
  config = load_config("default")
  with config.growth.unlocked():
    config.growth.budget_per_evnt = 5
  with pytest.raises(config_lib.ConfigError, match=(
      r"unknown config field config\.growth\.budget_per_evnt; did you mean "
      r"config\.growth\.budget_per_event\? fields of config\.growth: \[.*'budget_per_event', ")):
    config_lib.validate(config)


def test_value_of_another_type_is_named():
  config = load_config("default")
  with config.unlocked():
    del config.growth
    config.growth = 3
  with pytest.raises(config_lib.ConfigError, match=r"config\.growth=3 is invalid"):
    config_lib.validate(config)


def load_main():
  spec = importlib.util.spec_from_file_location("main", CONFIG_DIR.parent / "main.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv, message", [
    (["--config.growth.bogus_field=3"],
     r"unknown config field config\.growth\.bogus_field; fields of config\.growth: \["),
    (["--config.growth.budget_per_evnt", "3"],
     r"config\.growth\.budget_per_evnt; did you mean config\.growth\.budget_per_event\?"),
    (["--config", str(CONFIG_DIR / "tiny_test.py"), "--config.grwth.rule=random"],
     r"unknown config field config\.grwth; did you mean config\.growth\?"),
    (["--config.batch_size.x=1"], r"config\.batch_size is a value, not a group of fields"),
])
def test_unknown_command_line_field_is_named_before_the_flags_are_parsed(argv, message):
  main = load_main()
  with pytest.raises(config_lib.ConfigError, match=message):
    main.check_overrides(["main.py"] + argv)
  main.check_overrides(["main.py", "--config.growth.rule=random"])  # a field it has passes

