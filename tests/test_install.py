"""Installs (issue 11 item 7): setup.py declares every package the code imports, torch only in the
`dev` extra; TensorFlow is imported in one place, which hides every GPU from it."""
import ast
import importlib.metadata
import re
import runpy
import subprocess
import sys

import pytest
import setuptools

from conftest import REPO

FIRST_PARTY = {"onenip_jax", "data_pipelines", "configs", "launch"}
EXTRA_ONLY = {"tensorflow_datasets": "tfds"}  # module -> the extra that declares it
SOURCES = [p for d in sorted(FIRST_PARTY) for p in sorted((REPO / d).rglob("*.py"))]


def _setup_kwargs(monkeypatch) -> dict:
  got = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
  runpy.run_path(str(REPO / "setup.py"))
  return got


def _name(requirement: str) -> str:
  return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(path) -> set:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split(".")[0])
  return names


def test_every_imported_package_is_declared(monkeypatch):
  kw = _setup_kwargs(monkeypatch)
  required = {_name(r) for r in kw["install_requires"]}
  dists = importlib.metadata.packages_distributions()
  missing = []
  for path in SOURCES:
    for module in _imports(path) - FIRST_PARTY - set(sys.stdlib_module_names):
      declared = (required if module not in EXTRA_ONLY
                  else {_name(r) for r in kw["extras_require"][EXTRA_ONLY[module]]})
      if not {_name(d) for d in dists.get(module, [module])} & declared:
        missing.append(f"{path.relative_to(REPO)}: {module}")
  assert not missing


def test_torch_is_only_in_dev(monkeypatch):
  """Neither the install nor the `test` extra pulls torch (directly or through a requirement)."""
  kw = _setup_kwargs(monkeypatch)
  for req in kw["install_requires"] + kw["extras_require"]["test"]:
    name = _name(req)
    try:
      deps = {_name(r) for r in importlib.metadata.requires(name) or [] if "extra ==" not in r}
    except importlib.metadata.PackageNotFoundError:
      deps = set()
    assert "torch" not in {name} | deps, req
  assert "torch" in {_name(r) for r in kw["extras_require"]["dev"]}


def test_tensorflow_is_imported_only_through_tf_setup():
  pattern = re.compile(r"^\s*(import tensorflow(\s|$|\.)|from tensorflow(\s|\.) )", re.M)
  offenders = [str(p.relative_to(REPO)) for p in SOURCES
               if pattern.search(p.read_text()) and p.name != "tf_setup.py"]
  assert not offenders


def test_tf_setup_hides_gpus_before_the_pipeline_uses_tensorflow():
  probe = """
import tensorflow as tf
calls = []
tf.config.set_visible_devices = lambda devices, kind: calls.append((list(devices), kind))
from data_pipelines import input_pipeline, synthesis  # the modules that import TF at import time
assert calls and calls[0] == ([], "GPU"), calls
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
