r"""The paper's MVTec ablations (Tab. 4a rows and Tab. 4b depths) as one config with a variant arg.

  onenip-train --config configs/ablation.py:variant=unidirectional --workdir runs/abl-uni \
      --config.data.root=~/data/mvtec_anomaly_detection --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

  # all rows of Tab. 4a, one run each:
  python -m launch.sweep --config configs/ablation.py --workdir runs/abl \
      --grid 'arg.variant=uniad,prompt_static,unidirectional,uniad_restoration,no_refiner,full' \
      --config.data.root=~/data/mvtec_anomaly_detection --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Variants (Tab. 4a, line numbers of the paper):
  uniad               line 0: UniAD-style learned queries, no prompt, no restoration, no refiner
  prompt_static       line 1: prompt replaces the learned queries (unidirectional), no restoration/refiner
  unidirectional      = prompt_static (alias)
  bidirectional       line 2: bidirectional decoder, no restoration, no refiner
  uniad_restoration   line 3: UniAD + restoration stream
  no_refiner          line 4: bidirectional + restoration, no refiner
  full                line 5: the complete OneNIP
Depths (Tab. 4b): enc=1..4, dec=1..4 args.
"""
import os

from onenip_jax.config import base, loading

# The sibling config file, loaded by path (config files are not a package).
_MVTEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mvtec.py")

_VARIANTS = {
    "uniad": dict(decoder="uniad", restoration=False, refiner=False),
    "prompt_static": dict(decoder="unidirectional", restoration=False, refiner=False),
    "unidirectional": dict(decoder="unidirectional", restoration=False, refiner=False),
    "bidirectional": dict(decoder="bidirectional", restoration=False, refiner=False),
    "uniad_restoration": dict(decoder="uniad", restoration=True, refiner=False),
    "no_refiner": dict(decoder="bidirectional", restoration=True, refiner=False),
    "full": dict(decoder="bidirectional", restoration=True, refiner=True),
}


def get_config(arg=None):
  a = base.parse_args(arg, variant="full", enc=4, dec=4, res=224, backbone="b4")
  if a["variant"] not in _VARIANTS:
    raise ValueError(f"variant={a['variant']!r}: expected one of {sorted(_VARIANTS)}")
  c = loading.load_python_file(_MVTEC).get_config(f"res={a['res']},backbone={a['backbone']}")
  variant = dict(_VARIANTS[a["variant"]])
  c.loss.restoration = variant.pop("restoration")
  c.model.update(variant)
  c.model.enc_layers = a["enc"]
  c.model.dec_layers = a["dec"]
  return c
