r"""DeiT-S on ImageNet-100 (the paper's main claim), grown from the released reduced DeiT-S.

    python main.py --config configs/deit_s_in100.py                 # the paper's text
    python main.py --config configs/deit_s_in100.py:authors         # the released mechanism
    python main.py --config configs/deit_s_in100.py:static_full     # conventional: DeiT-S

VARIANT (config_lib.VARIANTS), every grown one from the same reduced start (6 heads of 32, MLP
768: 11.07M params) to 19.4M params over 9 events after epochs 50, 80, ..., 290:
  splitting      smallest splitting eigenvalue, gated units, one global ranking (paper's text)
  authors        row_sum score, linear units, by_kind quotas (the authors' released code)
  grad_norm      |dL/dq| of a linear unit, linear units
  random, random_linear, uniform, first_order     baselines, same budget
  static_full    DeiT-S; static_uniform: DeiT-S shrunk uniformly to 19.4M; static_reduced:
                 the reduced start, never grown

Needs the prepared ImageNet-100 (README: "Data"). Global batch 1024 over all devices.
"""

from hetscale_jax import config_lib


def get_config(variant="splitting"):
  return config_lib.paper_config(variant, "imagenet100", 100, 224, patch_size=16)
