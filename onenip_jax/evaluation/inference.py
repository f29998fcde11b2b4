"""The one inference path: images -> reconstruction and refiner maps (docs/algorithm.md §11).

In-training evaluation, `onenip-eval`, `onenip-export` and `onenip-predict` all go through
`Predictor`, so their numbers agree to float tolerance on the same images. `Trained` is what the
steps after training share: its Predictor and prompt pool are built once, from the final train
state or a checkpoint, and handed to the fusion constant, the calibration, the evaluation and the
export.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import indexing, input_pipeline
from onenip_jax import sharding
from onenip_jax.evaluation import scoring
from onenip_jax.models.features import FrozenFeatures
from onenip_jax.models.onenip import OneNIP


@dataclasses.dataclass
class PromptPool:
  """k pre-extracted normal prompts per class (paper §3.5).

  Attributes:
    features: (K, h, w, C) frozen features of the prompt images.
    class_ids: (K,) int, the class of each prompt.
    descriptors: (K, C) L2-normalised global average of `features`, matched by cosine similarity.
    paths: the K prompt image files when known (kept out of threshold calibration).
  """
  features: np.ndarray
  class_ids: np.ndarray
  descriptors: np.ndarray
  paths: tuple[str, ...] = ()


def global_descriptor(feats: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, C) L2-normalised spatial mean: the key for class-agnostic prompt choice."""
  d = jnp.mean(feats, axis=(1, 2))
  return d / (jnp.linalg.norm(d, axis=-1, keepdims=True) + 1e-12)


@dataclasses.dataclass
class Predictor:
  """A trained OneNIP ready for inference on a mesh.

  Attributes:
    model, features: the network and the frozen feature extractor.
    variables: {'params', 'batch_stats'} of the network; backbone_vars: of the backbone.
    mesh: where to run; batches are split over its `data` axis.
    pool: the prompt pool for class-agnostic prompts (`pool` mode), or None.
  """
  model: OneNIP
  features: FrozenFeatures
  variables: dict
  backbone_vars: dict
  mesh: jax.sharding.Mesh
  pool: PromptPool | None = None

  @functools.cached_property
  def _features_fn(self):
    return jax.jit(self.features, in_shardings=(sharding.replicated(self.mesh),
                                                sharding.data_sharded(self.mesh)),
                   out_shardings=sharding.data_sharded(self.mesh))

  def infer(self, variables, backbone_vars, images, prompts, pool_feats, pool_desc) -> dict:
    """The pure inference function (jit- and `jax.export`-able); see `__call__` for the maps."""
    f = self.features(backbone_vars, images)
    if prompts is not None:
      fp, choice = self.features(backbone_vars, prompts), jnp.full(f.shape[:1], -1)
    else:
      choice = jnp.argmax(global_descriptor(f) @ pool_desc.T, axis=-1)
      fp = pool_feats[choice]
    out = self.model.apply(variables, f, fp, train=False)
    ref = jax.nn.sigmoid(out["ref_logit"][..., 0]) if out.get("ref_logit") is not None else None
    return {"rec": out["rec"][..., 0], "ref": ref, "pool_choice": choice}

  def fused(self, variables, backbone_vars, images, pool_feats, pool_desc, pool_class_ids,
            scoring_params, *, pool_size: int):
    """Pool-mode prediction as one pure function (what `onenip-export` serialises).

    Args:
      images: (B, H, W, 3) normalised images.
      pool_feats: (K, h, w, C) prompt features; pool_desc: (K, C) their descriptors;
        pool_class_ids: (K,) int32 class of each prompt.
      scoring_params: (7,) float32 scoring vector (`scoring.SCORING_KEYS`).
      pool_size: the image score's box size.
    Returns:
      (anomaly map (B, H, W) float32, image score (B,) float32, matched class id (B,) int32) of
      `scoring.score`.
    """
    maps = self.infer(variables, backbone_vars, images, None, pool_feats, pool_desc)
    s, scores = scoring.score(maps["rec"], maps["ref"], scoring_params, pool_size)
    return s, scores, pool_class_ids[maps["pool_choice"]]

  @functools.cached_property
  def _infer_fn(self):
    repl, split = sharding.replicated(self.mesh), sharding.data_sharded(self.mesh)
    return jax.jit(self.infer, in_shardings=(repl, repl, split, split, repl, repl),
                   out_shardings=split)

  def feature_maps(self, images: jax.Array) -> jax.Array:
    """Global images (B, H, W, 3) -> frozen features (B, h, w, C)."""
    return self._features_fn(self.backbone_vars, images)

  def __call__(self, images: jax.Array, prompts: jax.Array | None = None) -> dict:
    """Maps for a global batch.

    Args:
      images: (B, H, W, 3) normalised test images, split over `data`.
      prompts: (B, H, W, 3) normalised prompt images (`class` mode), or None to choose each
        prompt from the pool by cosine similarity (`pool` mode).
    Returns:
      {'rec': (B, H, W) reconstruction error, 'ref': (B, H, W) refiner probability or None,
       'pool_choice': (B,) index into the pool (-1 in class mode)}.
    """
    if prompts is None:
      if self.pool is None:
        raise ValueError("pool prompt mode needs a prompt pool (eval.prompt_mode='pool')")
      pool = (self.pool.features, self.pool.descriptors)
    else:
      pool = (np.zeros((1,), np.float32), np.zeros((1,), np.float32))
    return self._infer_fn(self.variables, self.backbone_vars, images, prompts, *pool)


def build_prompt_pool(predictor: Predictor, index, cfg: ml_collections.ConfigDict) -> PromptPool:
  """Chooses `eval.pool_k` normal training images per class with `seed` and extracts their features."""
  rng = np.random.default_rng(cfg.seed)
  chosen = []
  for cls in index.classes:
    candidates = [i for i, s in enumerate(index.train) if s.cls == cls]
    if not candidates:
      raise ValueError(f"class {cls!r} has no normal training image for the prompt pool")
    k = min(cfg.eval.pool_k, len(candidates))
    chosen.extend(int(i) for i in rng.choice(candidates, size=k, replace=False))
  samples = [index.train[i] for i in chosen]
  h = predictor.features.grid(cfg.input_size)
  feats = np.zeros((len(samples), h, h, predictor.features.channels), np.float32)
  for batch in input_pipeline.make_eval_iterator(samples, index, cfg,
                                                 batch_size=eval_batch_size(cfg),
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count(),
                                                 with_prompt=False):
    g = sharding.to_global({k: batch[k] for k in ("image", "index", "valid")}, predictor.mesh)
    f = sharding.to_host(predictor.feature_maps(g["image"]))
    idx, valid = sharding.to_host(g["index"]), sharding.to_host(g["valid"])
    feats[idx[valid]] = f[valid]
  class_ids = np.asarray([index.class_id(s.cls) for s in samples], np.int32)
  return PromptPool(feats, class_ids, np.asarray(global_descriptor(jnp.asarray(feats))),
                    tuple(s.path for s in samples))


def eval_batch_size(cfg: ml_collections.ConfigDict) -> int:
  """The global batch size of inference: `eval.batch_size`, else `batch_size`."""
  return cfg.eval.batch_size or cfg.batch_size


class Trained:
  """A trained network and what every step after training shares.

  Built once (`from_state` at the end of training, `restore.load_checkpoint` for a stored run) and
  handed to the fusion constant, the calibration, the evaluation and the export's thresholds. The
  prompt pool is built on first use, once, from `index.train`.

  Attributes:
    cfg: the config of the steps after training (the stored run's with any overrides).
    predictor: the network with class prompts (no pool).
    fusion_c: the frozen fusion constant (nan until computed); step: the checkpoint's step.
    calibration: the run's calibration (`onenip_jax.evaluation.calibration`), or None.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, predictor: Predictor, *, index=None,
               fusion_c: float = float("nan"), step: int | None = None,
               calibration: dict | None = None, verify_cache: str | None = None):
    self.cfg, self.predictor, self.fusion_c, self.step = cfg, predictor, fusion_c, step
    self.calibration, self._index, self._verify_cache = calibration, index, verify_cache

  @classmethod
  def from_state(cls, cfg, state, index, features: FrozenFeatures, backbone_vars,
                 mesh) -> "Trained":
    """The Trained of a (replicated) train state: its params, batch statistics, fusion constant
    and step."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    predictor = Predictor(OneNIP.from_config(cfg.model), features, variables, backbone_vars, mesh)
    return cls(cfg, predictor, index=index, fusion_c=host_scalar(state.fusion_c),
               step=int(host_scalar(state.step)))

  @functools.cached_property
  def index(self) -> indexing.DatasetIndex:
    """The dataset of `cfg` (given, or indexed on first use)."""
    if self._index is not None:
      return self._index
    return indexing.index_config(self.cfg, verify_cache=self._verify_cache)

  @functools.cached_property
  def pool(self) -> PromptPool:
    """The prompt pool (`build_prompt_pool`), built on first use."""
    return build_prompt_pool(self.predictor, self.index, self.cfg)

  @functools.cached_property
  def _pool_predictor(self) -> Predictor:
    return dataclasses.replace(self.predictor, pool=self.pool)

  def predictor_for(self, prompt_mode: str) -> Predictor:
    """The Predictor with `prompt_mode`'s prompts: 'class' (from the ground-truth class) or
    'pool' (the pool's most similar)."""
    if prompt_mode == "class":
      return self.predictor
    if prompt_mode == "pool":
      return self._pool_predictor
    raise ValueError(f"config.eval.prompt_mode={prompt_mode!r}: use 'class' or 'pool'")


def host_scalar(x) -> float:
  """A replicated scalar as a Python float (also when the array spans several processes)."""
  return float(np.asarray(x.addressable_data(0)))


def make_model(cfg: ml_collections.ConfigDict) -> tuple[OneNIP, FrozenFeatures]:
  return OneNIP.from_config(cfg.model), FrozenFeatures.from_config(cfg.backbone)
