"""The layering of the code: no two modules of flame/ or merging/ import each other, directly
or through others (imports inside functions count: they are knots all the same)."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("flame", "merging")


def module_files() -> dict[str, str]:
  """{dotted module name: path} of every module in PACKAGES."""
  out = {}
  for package in PACKAGES:
    for root, _, names in os.walk(os.path.join(REPO, package)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          out[module.removesuffix(".__init__")] = path
  return out


def imports_of(path: str, known: set[str]) -> set[str]:
  """The modules of `known` that the file imports (``from a import b`` counts b when it is a
  module, else a)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name in known}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        name = f"{node.module}.{alias.name}"
        found.add(name if name in known else node.module)
  return found & known


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  graph["c"] = set()
  assert cycles(graph) == []


def test_no_module_imports_itself_through_others():
  files = module_files()
  assert "flame.data.decontamination" in files and "merging.io" in files
  known = set(files)
  graph = {m: imports_of(p, known) - {m} for m, p in files.items()}
  assert "flame.data.decontamination" in graph["flame.data.sources.base"]  # The scan sees edges.
  assert cycles(graph) == []


def test_checkpoints_do_not_reach_into_the_data_pipeline():
  files = module_files()
  known = set(files)
  for module, path in files.items():
    if module.startswith("flame.checkpoints"):
      assert not [m for m in imports_of(path, known) if m.startswith("flame.data")], module


def test_the_pipeline_is_the_top_floor():
  """flame.pipeline calls the entry points' library functions; nothing else imports it."""
  files = module_files()
  known = set(files)
  below = {m: [i for i in imports_of(p, known) if i.startswith("flame.pipeline")]
           for m, p in files.items() if not m.startswith("flame.pipeline")}
  assert {m: i for m, i in below.items() if i} == {}
  assert "merging.merge" in imports_of(files["flame.pipeline.pipeline"], known)


def test_the_tokenizers_read_file_formats_not_checkpoints():
  """A GGUF's tokenizer is read through the file format (flame.gguf_file), so the data
  pipeline's tokenizers do not pull in the checkpoint code (Orbax, the model)."""
  files = module_files()
  known = set(files)
  reached, todo = set(), ["flame.tokenizers"]
  while todo:
    module = todo.pop()
    for imported in imports_of(files[module], known) - reached:
      reached.add(imported)
      todo.append(imported)
  assert "flame.gguf_file" in reached
  assert not [m for m in reached if m.startswith("flame.checkpoints")], sorted(reached)


def test_merging_starts_without_orbax_or_flax():
  """flame-merge on Hugging Face folders never opens an Orbax checkpoint nor builds a Flax
  model: importing its entry point leaves both unloaded (a third of its startup time), and the
  lazily imported Orbax loads as soon as it is used."""
  code = ("import sys, merging.merge\n"
          "loaded = sorted(m for m in sys.modules if m.startswith('flax')"
          " or m.startswith('orbax.checkpoint.'))\n"
          "print(loaded)\n"
          "from flame.checkpoints import manager\n"
          "manager.ocp.CheckpointManager\n"
          "print('orbax.checkpoint.checkpoint_manager' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert out[0] == "[]", out[0]
  assert out[1] == "True"
