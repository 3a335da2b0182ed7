r"""DeiT-S trained from scratch on CIFAR-100 (the paper's second claim), grown from a bottleneck.

    python main.py --config configs/deit_s_cifar100.py[:VARIANT]

VARIANT and schedule as in deit_s_in100.py. 32 px images with 4 px patches: 64 tokens + class
token (the released code upsamples to 224 px instead).
"""

from hetscale_jax import config_lib


def get_config(variant="splitting"):
  return config_lib.paper_config(variant, "cifar100", 100, 32, patch_size=4)
