"""Config sections are read as attributes: no `.get(` on a config object in sora_jax/ outside the settings
constructors below (issue #23, "one place for each idea").

A default written at a `.get(key, default)` call is a second home for that key's default, beside its
section builder in experiments/common.py, and two calls soon disagree. Keys a config may lack (older
bundles, keys a builder leaves out) get their meaning in one place, config.complete (its OPTIONAL_KEYS);
a settings constructor that merges flags, a section and its own defaults may read with `.get` and is
named in ALLOWED.

The rule, by the syntax tree of every sora_jax/**/*.py: a call `R.get(...)` is flagged when its receiver R
is a config object, that is
  - a name `cfg`, `config`, or one starting with `cfg_` (cfg_mesh, cfg_lora: one section),
  - an attribute `.cfg` / `.config` of anything (self.cfg, bundle.config),
  - an attribute chain rooted in either (cfg.dit, self.cfg.data, config.train.optim), or
  - a name the same function assigned from one of these (`d = cfg.diffusion`).
Dicts read from JSON, batches, manifests and environments go by other names and are not flagged; a
foreign config (diffusers' or Hugging Face's config.json) is named for what it is (hf, hf_config).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (path under sora_jax/, function): settings constructors allowed to read a config with `.get`.
ALLOWED = {
    ("evaluate.py", "settings"),  # flags > the `eval` section > evaluate.DEFAULTS, for configs with none
    ("sharding.py", "mesh_sizes"),  # a `mesh` section names the axes it sizes; the others are 1
}


def _root_name(node: ast.AST) -> str | None:
  """The name at the root of an attribute chain, or the last attribute that is .cfg / .config."""
  while isinstance(node, ast.Attribute):
    if node.attr in ("cfg", "config"):
      return node.attr
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def _is_config_name(name: str | None) -> bool:
  return name is not None and (name in ("cfg", "config") or name.startswith("cfg_"))


class _Finder(ast.NodeVisitor):
  """Collects (line, function, source) of `.get(` calls on config objects."""

  def __init__(self, source: str):
    self.source, self.found, self.function, self.aliases = source, [], None, set()

  def _function(self, node):
    outer = (self.function, self.aliases)
    self.function, self.aliases = node.name, set()
    self.generic_visit(node)
    self.function, self.aliases = outer

  visit_FunctionDef = visit_AsyncFunctionDef = _function

  def _is_config(self, node: ast.AST) -> bool:
    name = _root_name(node)
    return _is_config_name(name) or (isinstance(node, ast.Name) and node.id in self.aliases)

  def visit_Assign(self, node):
    if self._is_config(node.value) and not isinstance(node.value, ast.Call):
      self.aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
    self.generic_visit(node)

  def visit_Call(self, node):
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == "get" and self._is_config(f.value):
      self.found.append((node.lineno, self.function, ast.get_source_segment(self.source, node)))
    self.generic_visit(node)


def config_gets(path: pathlib.Path) -> list[tuple[int, str | None, str]]:
  source = path.read_text()
  finder = _Finder(source)
  finder.visit(ast.parse(source))
  return finder.found


def test_no_get_on_config_sections_outside_settings_constructors():
  bad = []
  for path in sorted((ROOT / "sora_jax").rglob("*.py")):
    rel = path.relative_to(ROOT / "sora_jax").as_posix()
    bad += [f"sora_jax/{rel}:{line} ({fn}): {text}" for line, fn, text in config_gets(path)
            if (rel, fn) not in ALLOWED]
  assert not bad, ("read config keys as attributes (a key a config may lack: config.OPTIONAL_KEYS); "
                   "found:\n" + "\n".join(bad))


def test_the_rule_sees_section_reads(tmp_path):
  """The check itself: every form of the rule is caught, and dicts that are not configs are not."""
  p = tmp_path / "m.py"
  p.write_text("def f(cfg, batch, self):\n"
               "  cfg.dit.get('x')\n"
               "  d = cfg.diffusion\n"
               "  d.get('shift_rule', 'tokens')\n"
               "  self.cfg.get('sample', None)\n"
               "  batch.get('segment_ids')\n"
               "  stats = json.loads(text)\n"
               "  stats.get('shift')\n"
               "def g(cfg_mesh):\n"
               "  return cfg_mesh.get('tensor', 1)\n")
  assert [line for line, _, _ in config_gets(p)] == [2, 4, 5, 10]
