r"""OneNIP on BTAD (classes 01, 02, 03), one unified model.

  onenip-train --config configs/btad.py:res=224 --workdir runs/btad-224 \
      --config.data.root=/data/BTAD --config.data.meta_train=/data/BTAD/train.json \
      --config.data.meta_test=/data/BTAD/test.json --config.data.textures=/data/dtd \
      --config.model.backbone_weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=meta|mvtec (BTAD's own ok/ko folders).
Reference (v2 log, 224): mean 93.17 / 98.53 / 97.42 / 56.33.
"""
from configs import common


def get_config(arg=None):
  a = common.parse_args(arg, res=224, backbone="b4", layout="meta")
  c = common.get_base_config()
  c.input_size = a["res"]
  common.set_backbone(c, a["backbone"])
  c.data.layout = a["layout"]
  c.data.root = "data/BTAD/BTech_Dataset_transformed"
  if a["layout"] == "meta":
    c.data.meta_train = "data/BTAD/train.json"
    c.data.meta_test = "data/BTAD/test.json"
  c.data.textures = "data/dtd"
  return c
