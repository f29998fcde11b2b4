"""The exception of errors the user fixes: bad data, a missing file, folder or class, a damaged
export, a refused file, a bad setting, a full disk. Its message names the file or setting at
fault; the commands (`onenip_jax.cli`) print it in one line and exit with code 2, without a
traceback (`--verbose` shows it). Any other exception is a bug and keeps its traceback.

Standard library only: importable by `data_pipelines` and `onenip_jax` alike, and by the CLI
before JAX or TensorFlow.
"""

EXIT_CODE = 2


class UserError(ValueError):
  """An error the user fixes; the message names the file or setting at fault."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or folder the user named (or a run needs) is missing."""
