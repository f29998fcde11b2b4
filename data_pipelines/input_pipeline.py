"""tf.data input pipelines: decoding, resizing, prompt sampling, training and evaluation batches.

Every image goes through the same TensorFlow ops (`resize_bytes`), so training, evaluation and
single-image inference (`load_image`) see identical pixels. The encoded bytes come from the sample's
file, or from its byte range in a record shard (layout "tfds": `records.SampleBytes`):
  decode (format from the bytes: JPEG by TF with the accurate IDCT, as PIL/OpenCV; PNG by TF;
  BMP/TIFF/anything else by PIL in a `tf.numpy_function`, as TF cannot read TIFF nor palette BMP)
  -> RGB (gray replicated, alpha dropped), 16-bit -> 8-bit (>> 8)
  -> bilinear antialiased resize to S x S (PIL BILINEAR within ~0.5/255) -> round to uint8
  -> (x / 255 - mean) / std, float32 NHWC.
Masks: decoded to one channel, nearest resize picking PIL NEAREST's pixels, `> 0` -> {0, 1} (any
non-zero pixel is a defect: VisA marks defects with small class ids, MVTec with 255).

Randomness is stateless: the training stream is an endless sequence of epochs, epoch e being a
permutation of `index.train` seeded by (seed, e); stream position q = s * B + j is sample j of
global step s (B = global batch); its prompt and synthesis seed derive from (seed, q). Process p of
P decodes only positions [s*B + p*B/P, s*B + (p+1)*B/P) of each step, so the concatenated batches
do not depend on P, and `start_step` resumes exactly.

Batch keys (numpy, b = per-process batch, H = W = input_size):
  train: normal, synthetic, prompt (b,H,W,3) f32; mask (b,H,W,1) f32; class_id, normal_index,
         prompt_index (b,) int32. `decode_clean=False` drops normal and prompt.
  eval:  image (b,H,W,3) f32; prompt (b,H,W,3) f32 and prompt_index (b,) int32 if with_prompt;
         mask (b,H,W,1) f32; has_mask, valid (b,) bool; label, class_id, index (b,) int32.
         Padding rows (valid False): blank image and prompt, zero mask, index and prompt_index
         -1, label 0, class_id that of samples[0].
Images are normalised after batching (one vectorised op per batch); the map functions are not
autograph-converted (tracing the synthesis graph with autograph took 3x longer).
"""
import math
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from data_pipelines import indexing, records, synthesis, textures
from data_pipelines.errors import UserError
from data_pipelines.pil_decode import pil_decode
from data_pipelines.tf_setup import import_tensorflow

tf = import_tensorflow()

# Stream tags folded into the seed so that the random draws are independent.
_TAG_EPOCH, _TAG_PROMPT, _TAG_SYNTH, _TAG_EVAL_PROMPT = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------
# Decoding and preprocessing (TF ops)


def _pil_decode(contents: bytes, channels: int) -> np.ndarray:
  """`pil_decode` for `tf.numpy_function`, which passes the bytes as a 0-d object array."""
  if isinstance(contents, np.ndarray):
    contents = contents.item()
  return pil_decode(contents, channels, max_pixels=None)  # indexing applied data.max_pixels


def decode(contents: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """Decodes encoded image bytes to uint8 (h, w, channels), format detected from the bytes.

  Args:
    contents: tf.string scalar, the file's bytes.
    channels: 3 (RGB: gray replicated, alpha dropped) or 1.

  Returns:
    tf.uint8 (h, w, channels).
  """
  is_png = tf.equal(tf.strings.substr(contents, 0, 4), b"\x89PNG")

  def jpeg():
    return tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE")

  def png():
    return tf.io.decode_image(contents, channels=channels, dtype=tf.uint8,
                              expand_animations=False)

  def other():
    img = tf.numpy_function(lambda c: _pil_decode(c, channels), [contents], tf.uint8,
                            stateful=False)
    return tf.ensure_shape(img, [None, None, channels])

  img = tf.case([(tf.io.is_jpeg(contents), jpeg), (is_png, png)],
                default=other, exclusive=False)
  img.set_shape([None, None, channels])
  return img


def decode_resize(path: tf.Tensor, size: int) -> tf.Tensor:
  """Reads an image file (tf.string scalar path): `resize_bytes` of its bytes."""
  return resize_bytes(tf.io.read_file(path), size)


def resize_bytes(contents: tf.Tensor, size: int) -> tf.Tensor:
  """Encoded image bytes -> tf.uint8 (size, size, 3), as PIL `resize((size, size), BILINEAR)`."""
  img = tf.image.resize(decode(contents, 3), (size, size), method="bilinear", antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)


def _pil_nearest_table(n_in: np.ndarray, n_out: int) -> np.ndarray:
  """Source index of each output index of PIL's NEAREST resize (its float64 running sum)."""
  step = np.float64(n_in) / n_out
  steps = np.full(n_out, step)
  steps[0] = 0.5 * step
  return np.minimum(np.cumsum(steps).astype(np.int64), int(n_in) - 1)


def resize_nearest(image: tf.Tensor, size: int) -> tf.Tensor:
  """(h, w, c) -> (size, size, c) picking the same pixels as PIL `resize(..., NEAREST)`."""
  shape = tf.shape(image, out_type=tf.int64)

  def table(n):
    t = tf.numpy_function(lambda m: _pil_nearest_table(m, size), [n], tf.int64, stateful=False)
    return tf.ensure_shape(t, [size])

  return tf.gather(tf.gather(image, table(shape[0]), axis=0), table(shape[1]), axis=1)


def decode_mask(path: tf.Tensor, size: int) -> tf.Tensor:
  """Reads a mask file: `mask_bytes` of its bytes."""
  return mask_bytes(tf.io.read_file(path), size)


def mask_bytes(contents: tf.Tensor, size: int) -> tf.Tensor:
  """Encoded mask -> tf.float32 (size, size, 1) in {0, 1}: PIL-exact nearest resize, `> 0`."""
  return tf.cast(resize_nearest(decode(contents, 1), size) > 0, tf.float32)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def load_image(path: Union[str, bytes], size: int, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None) -> np.ndarray:
  """One image preprocessed exactly as in the pipelines (single-image inference, heatmaps).

  Args:
    path: image file, or its encoded bytes (`Sample.read_image()`).
    size: output height = width.
    mean, std: per-channel, [0, 1] scale; both None returns the resized uint8 image instead.

  Returns:
    float32 (size, size, 3) normalised, or uint8 (size, size, 3) when mean and std are None.
  """
  img = (resize_bytes if isinstance(path, bytes) else decode_resize)(tf.constant(path), size)
  if mean is None and std is None:
    return img.numpy()
  return normalize(img, mean, std).numpy()


def load_mask(path: Union[str, bytes], size: int) -> np.ndarray:
  """One mask file (or its bytes) preprocessed as in the pipelines: f32 (size, size, 1) in {0, 1}."""
  return (mask_bytes if isinstance(path, bytes) else decode_mask)(tf.constant(path), size).numpy()


# ------------------------------------------------------------------------------------------------
# Helpers


def _seed(seed: int, tag: int, value: tf.Tensor) -> tf.Tensor:
  """Stateless (2,) int seed from (seed, tag, value)."""
  base = tf.constant([seed, tag], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64), alg="philox")


def _parallel(cfg: Any) -> int:
  n = int(cfg.data.get("num_parallel_calls", -1))
  return tf.data.AUTOTUNE if n < 0 else max(1, n)


class _PromptTable:
  """Normal training images grouped by class, for stateless prompt draws (TF ops)."""

  def __init__(self, index: indexing.DatasetIndex):
    groups = [[] for _ in index.classes]
    for i, s in enumerate(index.train):
      if s.label == 0:
        groups[index.class_id(s.cls)].append(i)
    for c, g in zip(index.classes, groups):
      if not g:
        raise UserError(f"class {c!r} has no normal training image to draw prompts from")
    self.flat = tf.constant(np.concatenate(groups).astype(np.int64))
    self.offset = tf.constant(np.cumsum([0] + [len(g) for g in groups[:-1]]).astype(np.int64))
    self.count = tf.constant(np.array([len(g) for g in groups], np.int64))

  def draw(self, class_id: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Index into `index.train` of a uniformly drawn normal image of `class_id` (int64)."""
    k = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=tf.gather(self.count, class_id),
                                    dtype=tf.int64)
    return tf.gather(self.flat, tf.gather(self.offset, class_id) + k)


def _per_process(batch_size: int, process_count: int, name: str) -> int:
  if process_count < 1 or batch_size % process_count:
    raise UserError(f"{name}={batch_size} is not divisible by the process count {process_count}")
  return batch_size // process_count


def steps_per_epoch(index: indexing.DatasetIndex, batch_size: int) -> int:
  """ceil(len(train) / batch_size): global steps per pass over the training list."""
  return math.ceil(len(index.train) / batch_size)


def _normalize_keys(batch: dict, keys: Sequence[str], mean, std) -> dict:
  """Normalises the uint8 images under `keys` (after batching: one vectorised op per batch)."""
  return {k: normalize(v, mean, std) if k in keys else v for k, v in batch.items()}


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  opt = tf.data.Options()
  opt.deterministic = True
  return ds.with_options(opt)


# ------------------------------------------------------------------------------------------------
# Training


def train_positions(n: int, seed: int, global_batch: int, *, process_index: int = 0,
                    process_count: int = 1, start_step: int = 0) -> tf.data.Dataset:
  """The (stream position, train index) pairs process `process_index` handles, in order.

  Args:
    n: len(index.train).
    seed: config seed.
    global_batch: B.
    process_index, process_count: this process and the number of processes.
    start_step: first global step.

  Returns:
    An endless dataset of (position int64, train index int64).
  """
  b = _per_process(global_batch, process_count, "batch_size")
  lo = process_index * b
  start = start_step * global_batch
  first_epoch = start // n

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                    seed=_seed(seed, _TAG_EPOCH, e), alg="philox")
    pos = e * n + tf.range(n, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((pos, perm))

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(start - first_epoch * n)
  if process_count > 1:
    ds = ds.filter(lambda q, i: tf.logical_and(q % global_batch >= lo, q % global_batch < lo + b))
  return ds


def make_train_iterator(index: indexing.DatasetIndex, cfg: Any, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0,
                        decode_clean: bool = True) -> Iterator[dict]:
  """Endless iterator of this process's training batches (see the module doc for the keys).

  Args:
    index: the indexed dataset.
    cfg: experiment config (seed, input_size, batch_size = global batch, data.*).
    process_index, process_count: this process of how many; each gets batch_size // count.
    start_step: global step to start from (resume).
    decode_clean: False omits `normal` and `prompt` (the feature cache has them).

  Returns:
    Iterator of dicts of numpy arrays.
  """

  size, seed = int(cfg.input_size), int(cfg.seed)
  b = _per_process(int(cfg.batch_size), process_count, "batch_size")
  if not index.train:
    raise UserError("the training list is empty")
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
  images = records.SampleBytes(index.train)
  class_ids = tf.constant([index.class_id(s.cls) for s in index.train], tf.int64)
  prompts = _PromptTable(index)
  texture_list = tf.constant(textures.texture_paths(cfg.data.textures), tf.string)
  syn_cfg = cfg.data.synthesis

  @tf.autograph.experimental.do_not_convert
  def load(q, i):
    c = tf.gather(class_ids, i)
    p = prompts.draw(c, _seed(seed, _TAG_PROMPT, q))
    img = resize_bytes(images.read(i), size)
    syn, mask = synthesis.synthesize(img, _seed(seed, _TAG_SYNTH, q), texture_list, syn_cfg)
    out = {"synthetic": tf.ensure_shape(syn, [size, size, 3]),
           "mask": tf.ensure_shape(tf.cast(mask, tf.float32), [size, size, 1]),
           "class_id": tf.cast(c, tf.int32), "normal_index": tf.cast(i, tf.int32),
           "prompt_index": tf.cast(p, tf.int32)}
    if decode_clean:
      out["normal"] = img
      out["prompt"] = resize_bytes(images.read(p), size)
    return out

  ds = train_positions(len(index.train), seed, int(cfg.batch_size), process_index=process_index,
                       process_count=process_count, start_step=start_step)
  ds = ds.map(load, num_parallel_calls=_parallel(cfg), deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.map(lambda x: _normalize_keys(x, ("normal", "synthetic", "prompt"), mean, std))
  ds = _options(ds.prefetch(tf.data.AUTOTUNE))
  return ds.as_numpy_iterator()


# ------------------------------------------------------------------------------------------------
# Evaluation


def eval_positions(n: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> np.ndarray:
  """Positions in `samples` this process handles (-1 = padding), in batch order.

  The list is padded to a multiple of the global `batch_size`; process p takes its contiguous
  slice of every global batch.
  """
  b = _per_process(batch_size, process_count, "batch_size")
  total = math.ceil(n / batch_size) * batch_size
  pos = np.arange(total).reshape(-1, batch_size)[:, process_index * b:(process_index + 1) * b]
  pos = pos.reshape(-1)
  return np.where(pos < n, pos, -1).astype(np.int64)


def make_eval_iterator(samples: Sequence[indexing.Sample], index: indexing.DatasetIndex, cfg: Any,
                       *, batch_size: int, process_index: int = 0, process_count: int = 1,
                       with_prompt: bool = True, seed_positions=None,
                       synthesis_seed: Optional[int] = None) -> Iterator[dict]:
  """Iterator over this process's share of `samples`, padded (see the module doc for the keys).

  Args:
    samples: any samples (the test set, or index.train for caches / the fusion constant).
    index: gives class ids and the normal training images prompts are drawn from.
    cfg: experiment config (seed, input_size, data.*).
    batch_size: GLOBAL batch size; each process gets batch_size // process_count.
    process_index, process_count: this process of how many.
    with_prompt: add a random normal train image of the sample's class, deterministic for
      (seed, position in samples).
    seed_positions: (len(samples),) positions to seed the prompt draw with instead (evaluating a
      subset, e.g. one class, with the prompts of the full list); `index` stays the batch row's
      position in `samples`.
    synthesis_seed: when set, each image is replaced by a synthetic anomaly made from it by the
      training synthesis seeded by (synthesis_seed, seed position): `mask` is its mask, `has_mask`
      True, `label` 1 (calibration's validation anomalies; training uses `cfg.seed`).

  Returns:
    Iterator of dicts of numpy arrays; ceil(len(samples) / batch_size) batches.
  """
  size, seed = int(cfg.input_size), int(cfg.seed)
  b = _per_process(int(batch_size), process_count, "batch_size")
  n = len(samples)
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
  if n == 0:
    return iter(())
  images, masks = records.SampleBytes(samples), records.SampleBytes(samples, mask=True)
  with_mask = tf.constant([bool(s.mask_path) for s in samples], tf.bool)
  labels = tf.constant([int(s.label) for s in samples], tf.int32)
  class_ids = tf.constant([index.class_id(s.cls) for s in samples], tf.int64)
  train_images = records.SampleBytes(index.train) if with_prompt else None
  prompts = _PromptTable(index) if with_prompt else None
  pos = eval_positions(n, int(batch_size), process_index, process_count)
  seed_pos = tf.constant(np.arange(n) if seed_positions is None
                         else np.asarray(seed_positions, np.int64), tf.int64)
  if synthesis_seed is not None:
    texture_list = tf.constant(textures.texture_paths(cfg.data.textures), tf.string)

  @tf.autograph.experimental.do_not_convert
  def load(k):
    valid = k >= 0
    i = tf.maximum(k, 0)
    c = tf.gather(class_ids, i)
    blank = tf.zeros([size, size, 3], tf.uint8)
    image = tf.cond(valid, lambda: resize_bytes(images.read(i), size), lambda: blank)
    has_mask = tf.logical_and(valid, tf.gather(with_mask, i))
    mask = tf.cond(has_mask, lambda: mask_bytes(masks.read(i), size),
                   lambda: tf.zeros([size, size, 1], tf.float32))
    label = tf.where(valid, tf.gather(labels, i), 0)
    if synthesis_seed is not None:
      syn, syn_mask = synthesis.synthesize(
          image, _seed(synthesis_seed, _TAG_SYNTH, tf.gather(seed_pos, i)), texture_list,
          cfg.data.synthesis)
      image = tf.ensure_shape(syn, [size, size, 3])
      mask = tf.where(valid, tf.cast(syn_mask, tf.float32), 0.0)
      mask = tf.ensure_shape(mask, [size, size, 1])
      has_mask, label = valid, tf.cast(valid, tf.int32)
    out = {"image": image, "mask": mask, "has_mask": has_mask, "valid": valid,
           "label": label,
           "class_id": tf.cast(c, tf.int32), "index": tf.cast(k, tf.int32)}
    if with_prompt:
      p = prompts.draw(c, _seed(seed, _TAG_EVAL_PROMPT, tf.gather(seed_pos, i)))
      out["prompt_index"] = tf.where(valid, tf.cast(p, tf.int32), -1)
      out["prompt"] = tf.cond(valid, lambda: resize_bytes(train_images.read(p), size),
                              lambda: blank)
    return out

  ds = tf.data.Dataset.from_tensor_slices(pos).map(load, num_parallel_calls=_parallel(cfg),
                                                   deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  ds = ds.map(lambda x: _normalize_keys(x, ("image", "prompt"), mean, std))
  ds = _options(ds.prefetch(tf.data.AUTOTUNE))
  return ds.as_numpy_iterator()
