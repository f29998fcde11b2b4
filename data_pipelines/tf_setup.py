"""The project's one way to import TensorFlow. TensorFlow serves tf.data only (on the CPU), so
every GPU is hidden from it: it never takes accelerator memory that JAX needs."""


def import_tensorflow():
  """The `tensorflow` module, with no GPU visible to it (hidden before TF initialises devices)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices initialised already: by an earlier call, or by TF used elsewhere
    pass
  return tf
