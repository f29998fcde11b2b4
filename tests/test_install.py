"""Installs: setup.py declares every package the code imports, torch only in the
`dev` extra; TensorFlow is imported in one place, which hides every GPU from it. Exactly two
top-level packages are installed; configs/ and launch/ are files run by path. The plain
install is the export consumer, the `train` extra the rest; the declared minimum versions are the
tested ones (constraints-min.txt)."""
import ast
import importlib.metadata
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import setuptools

from conftest import REPO
from onenip_jax import cli

INSTALLED = {"onenip_jax", "data_pipelines"}  # the top-level packages setup.py installs
FIRST_PARTY = INSTALLED | {"configs", "launch"}   # folders of the repository's own code
EXTRA_ONLY = {"tensorflow_datasets": "tfds"}  # module -> the extra that declares it
SOURCES = [p for d in sorted(FIRST_PARTY) for p in sorted((REPO / d).rglob("*.py"))]
# Packages whose minimum version setup.py declares: the versions the suite was run with.
TESTED_MINIMUMS = ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
                   "tensorflow-datasets")
TRAINING_STACK = {"flax", "optax", "orbax-checkpoint", "tensorflow", "tensorflow-cpu", "clu",
                  "tensorboard", "scikit-image", "etils", "tensorflow-datasets", "torch"}


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
  required = {_name(r) for r in kw["install_requires"] + kw["extras_require"]["train"]}
  dists = importlib.metadata.packages_distributions()
  missing = []
  for path in SOURCES:
    for module in _imports(path) - FIRST_PARTY - set(sys.stdlib_module_names):
      declared = (required if module not in EXTRA_ONLY
                  else {_name(r) for r in kw["extras_require"][EXTRA_ONLY[module]]})
      if not {_name(d) for d in dists.get(module, [module])} & declared:
        missing.append(f"{path.relative_to(REPO)}: {module}")
  assert not missing


def test_plain_install_is_the_offline_set_and_the_full_extras_hold_train(monkeypatch):
  """install_requires has none of the training stack; `test`, `dev` and `tfds` include `train`."""
  kw = _setup_kwargs(monkeypatch)
  plain = {_name(r) for r in kw["install_requires"]}
  assert {"jax", "numpy", "pillow", "simplejpeg"} <= plain and not plain & TRAINING_STACK
  extras = kw["extras_require"]
  assert {"flax", "optax", "orbax-checkpoint", "tensorflow-cpu"} <= {_name(r) for r in extras["train"]}
  for extra in ("test", "dev", "tfds"):
    assert set(extras["train"]) <= set(extras[extra]), extra
  assert cli.TRAIN_INSTALL == 'pip install "onenip-jax[train]"'


def _declared_minimums(kw) -> dict:
  reqs = kw["install_requires"] + [r for rs in kw["extras_require"].values() for r in rs]
  found = {}
  for req in reqs:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([0-9][0-9a-z.]*)", req.replace(" ", ""))
    if m:
      assert found.setdefault(_name(m.group(1)), m.group(3)) == m.group(3), req
  return found


def test_declared_minimums_are_the_tested_versions(monkeypatch):
  """Each of TESTED_MINIMUMS has a minimum in setup.py equal to its pin in constraints-min.txt
  (`pip install -c constraints-min.txt` tests exactly the minimums) and not above the installed
  version; no other package declares a minimum that constraints-min.txt does not pin."""
  minimums = _declared_minimums(_setup_kwargs(monkeypatch))
  pins = {}
  for line in (REPO / "constraints-min.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[_name(name)] = version.strip()
  assert set(TESTED_MINIMUMS) <= set(pins) and pins == minimums
  for name, version in minimums.items():
    installed = importlib.metadata.version(name)
    assert _version(installed) >= _version(version), (name, installed, version)


def _version(text: str) -> tuple:
  return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def test_code_imports_only_installed_first_party_packages():
  """configs/ and launch/ are not packages: no code imports them (a script or config loads a
  sibling file by path with `loading.load_python_file`)."""
  offenders = [f"{p.relative_to(REPO)}: {m}" for p in SOURCES
               for m in _imports(p) & (FIRST_PARTY - INSTALLED)]
  assert not offenders
  assert not [d for d in FIRST_PARTY - INSTALLED if (REPO / d / "__init__.py").exists()]


def test_install_has_exactly_two_top_level_packages(tmp_path):
  """`pip install --no-deps --target` of a copy of the sources: only onenip_jax and data_pipelines."""
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  for d in FIRST_PARTY:
    shutil.copytree(REPO / d, src / d, ignore=ignore)
  shutil.copy(REPO / "setup.py", src / "setup.py")
  out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(tmp_path / "site"), str(src)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  top = {p.name for p in (tmp_path / "site").iterdir()
         if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "bin"}
  assert top == INSTALLED
  (top_level,) = (tmp_path / "site").glob("*.dist-info/top_level.txt")
  assert set(top_level.read_text().split()) == INSTALLED


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


@pytest.mark.parametrize("how", ["path", "module"])
def test_launch_scripts_run_by_path_and_as_modules(how, tmp_path):
  """`python launch/X.py` from anywhere (only installed packages on its sys.path, its sibling
  bench_train.py loaded by path) and `python -m launch.X` from the repository root."""
  cmd, cwd = (([str(REPO / "launch" / "profile_step.py")], tmp_path) if how == "path"
              else (["-m", "launch.bench_train"], REPO))
  out = subprocess.run([sys.executable, *cmd, "--help"], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
