"""The package order of docs/architecture.md ("Where new code goes"): every import of the project's
own modules, those inside functions included, points down the stack of stages; and no name bound
inside a function reuses the name of a project module that its file imports."""
import ast

from conftest import REPO

# Lowest first; a module may import its own layer and the layers before it.
LAYERS = ("data_pipelines", "onenip_jax.models", "onenip_jax.config",
          ("onenip_jax.sharding", "onenip_jax.compile_options"), "onenip_jax.training",
          "onenip_jax.evaluation", "onenip_jax.serving", "onenip_jax.train", "onenip_jax.cli")
PACKAGES = ("onenip_jax", "data_pipelines")


def _layer(module: str):
  for i, layer in enumerate(LAYERS):
    for prefix in layer if isinstance(layer, tuple) else (layer,):
      if module == prefix or module.startswith(prefix + "."):
        return i
  return None


def _sources():
  for pkg in PACKAGES:
    for path in sorted((REPO / pkg).rglob("*.py")):
      name = ".".join(path.relative_to(REPO).with_suffix("").parts)
      yield name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _imported(node) -> list:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    return [f"{node.module}.{a.name}" for a in node.names]
  return []


def test_imports_point_down_the_stages():
  upward = []
  for name, tree in _sources():
    if name == "onenip_jax":
      continue
    mine = _layer(name)
    assert mine is not None, f"{name} is in no layer of LAYERS"
    for node in ast.walk(tree):
      for target in _imported(node):
        theirs = _layer(target)
        if theirs is not None and theirs > mine:
          upward.append(f"{name}:{node.lineno} imports {target}")
  assert not upward


def test_no_local_name_shadows_an_imported_module():
  """A local that reuses an imported module's name makes every use of the module in that
  function an UnboundLocalError (or silently the local)."""
  found = []
  for name, tree in _sources():
    modules = {}
    for node in tree.body:
      for target, alias in ((t, a) for t, a in zip(_imported(node), getattr(node, "names", []))):
        if target.split(".")[0] in PACKAGES:
          modules[alias.asname or alias.name.split(".")[0]] = target
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      a = fn.args
      bound = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [v for v in (a.vararg, a.kwarg)
                                                                      if v]}
      body = fn.body if isinstance(fn.body, list) else [fn.body]
      for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
          bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
          bound.add(node.name)
      found += [f"{name}: {fn.name if hasattr(fn, 'name') else 'lambda'} binds {b!r} "
                f"({modules[b]})" for b in sorted(bound & set(modules))]
  assert not found
