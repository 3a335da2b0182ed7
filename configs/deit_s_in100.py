r"""DeiT-S on ImageNet-100 (the paper's main claim), grown from a bottleneck model.

    python main.py --config configs/deit_s_in100.py              # grow by splitting eigenvalues
    python main.py --config configs/deit_s_in100.py:random       # same budget, random neurons
    python main.py --config configs/deit_s_in100.py:uniform      # same budget, equal share per layer
    python main.py --config configs/deit_s_in100.py:first_order  # same budget, |dL/da| of a random r
    python main.py --config configs/deit_s_in100.py:static_full     # conventional: DeiT-S
    python main.py --config configs/deit_s_in100.py:static_uniform  # conventional: DeiT-S shrunk
                                                    #   uniformly to the grown model's size
    python main.py --config configs/deit_s_in100.py:static_reduced  # the bottleneck start, never grown

Needs the prepared ImageNet-100 (README: "Data"). Global batch 1024 over all devices.
"""

from hetscale_jax import config_lib


def get_config(variant="splitting"):
  return config_lib.paper_config(variant, "imagenet100", 100, 224, patch_size=16, num_epochs=300,
                                 growth_epochs=(20.0, 40.0, 60.0, 80.0))
