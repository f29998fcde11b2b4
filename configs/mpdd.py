r"""OneNIP on MPDD (6 classes of painted metal parts), one unified model.

Reads the download as unpacked (MPDD, https://github.com/stepanje/MPDD): `data.root` is the folder
holding bracket_black/ ... tubes/, in MVTec AD's layout (train/good, test/<defect>,
ground_truth/<defect>/NNN_mask.png).

  onenip-train --config configs/mpdd.py:res=224 --workdir runs/mpdd-224 \
      --config.data.root=~/data/MPDD --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=mvtec|meta (meta files of one's own:
--config.data.meta_train=... --config.data.meta_test=...). No published OneNIP reference.
"""
from onenip_jax.config import base

CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


def get_config(arg=None):
  return base.dataset_config(arg, layout="mvtec", classes=CLASSES, root="data/MPDD",
                             meta_dir="data/MPDD")[0]
