r"""DeiT-S on ImageNet-100 (the paper's main claim), grown from the released reduced DeiT-S.

    python main.py --config configs/deit_s_in100.py                 # the paper's text
    python main.py --config configs/deit_s_in100.py:authors         # the released mechanism
    python main.py --config configs/deit_s_in100.py:static_full     # conventional: DeiT-S

VARIANT: a name of config_lib.VARIANTS, where each is defined (or "splitting@0.3": a gated one
at another unit scale). Every grown one starts from the same reduced DeiT-S (6 heads of 32, MLP
768: 11.07M params) and grows to 19.4M params over 9 events after epochs 50, 80, ..., 290;
static_full is DeiT-S, static_uniform DeiT-S shrunk uniformly to 19.4M, static_reduced the
reduced start, never grown.

Needs the prepared ImageNet-100 (README: "Data"). Global batch 1024 over all devices.
"""

from hetscale_jax import config_lib


def get_config(variant="splitting"):
  return config_lib.paper_config(variant, "imagenet100", 100, 224, patch_size=16)
