"""The method registry's names, summaries and option defaults, read from the source
of `common/methods/` without importing it (importing builds on TensorFlow).

The registry is the files themselves: every module of `common/methods/` whose
name does not start with `_`, and in it each class decorated with `@register`,
with its `name`, `summary` and `Options` (a dataclass whose fields have constant
defaults, given directly, through `dataclasses.field(default=...)` or through a
helper such as `temperature_field()` that returns one). This module parses those
files with `ast` and evaluates only constant expressions; anything else is an error naming
the file and line. `tests/test_report.py` checks the result against the imported
registry.
"""

import ast
import dataclasses
import functools
import importlib.util
from pathlib import Path

PACKAGE = "kdtoolkit.methods"


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """A registered method as its file declares it: `options` maps each field of its
    `Options`, in dataclass order, to its default (`dataclasses.MISSING` for none)."""

    name: str
    module: str
    summary: str
    options: dict


def methods_folder():
    """The folder of `kdtoolkit.methods`, found without running its `__init__`."""
    spec = importlib.util.find_spec(PACKAGE.split(".")[0])
    return Path(spec.origin).parent / PACKAGE.split(".")[1]


class _Source:
    """One parsed module of `kdtoolkit.methods`."""

    def __init__(self, folder, module):
        self.path = folder / f"{module}.py"
        self.tree = ast.parse(self.path.read_text(encoding="utf-8"), filename=str(self.path))
        self.top = {}  # module-level name -> its node (class, function or assigned value)
        self.imported = {}  # name -> (module of kdtoolkit.methods, name there)
        for node in self.tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                self.top[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.top[node.targets[0].id] = node.value
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (node.module[len(PACKAGE) + 1:], alias.name)

    def error(self, node, what):
        return ValueError(f"{self.path}:{getattr(node, 'lineno', '?')}: {what} (reports/registry.py reads "
                          "constants only)")


class _Reader:
    """Resolves classes, their attributes and dataclass fields across the parsed modules."""

    def __init__(self, folder):
        self.folder = folder
        self.sources = {}

    def source(self, module):
        if module not in self.sources:
            self.sources[module] = _Source(self.folder, module)
        return self.sources[module]

    def resolve(self, source, node):
        """`(source, definition)` of a name (or `module.name`) used in `source`."""
        if isinstance(node, ast.Name) and node.id in source.top:
            return source, source.top[node.id]
        if isinstance(node, ast.Name) and node.id in source.imported:
            module, name = source.imported[node.id]
            return self.resolve(self.source(module), ast.Name(name))
        raise source.error(node, f"cannot find {ast.unparse(node)}")

    def constant(self, source, node, names=None):
        """The value of a constant expression (`names`: a function's bound arguments)."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self.constant(source, e, names) for e in node.elts)
        if isinstance(node, ast.Name) and names is not None and node.id in names:
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.constant(source, node.operand, names)
            return -value if isinstance(node.op, ast.USub) else +value
        operators = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                     ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a ** b}
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](self.constant(source, node.left, names),
                                            self.constant(source, node.right, names))
        raise source.error(node, f"{ast.unparse(node)} is not a constant")

    def attribute(self, source, cls, name):
        """`(source, value node)` of class attribute `name`, from `cls` or its bases."""
        for node in cls.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return source, node.value
        for base in cls.bases:
            found = self.attribute(*self.resolve(source, base), name)
            if found is not None:
                return found
        return None

    def fields(self, source, cls):
        """`{field: default}` of dataclass `cls`, its bases' fields first."""
        fields = {}
        for base in reversed(cls.bases):
            fields.update(self.fields(*self.resolve(source, base)))
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and "ClassVar" not in ast.unparse(node.annotation):
                fields[node.target.id] = self.default(source, node.value)
        return fields

    def default(self, source, node, names=None):
        """The default of a dataclass field whose right-hand side is `node`."""
        if node is None:
            return dataclasses.MISSING
        if not isinstance(node, ast.Call):
            return self.constant(source, node, names)
        if ast.unparse(node.func) in ("dataclasses.field", "field"):
            given = {k.arg: k.value for k in node.keywords}
            return self.constant(source, given["default"], names) if "default" in given else dataclasses.MISSING
        helper_source, helper = self.resolve(source, node.func)  # e.g. temperature_field(): binds its arguments
        if not isinstance(helper, ast.FunctionDef):
            raise source.error(node, f"{ast.unparse(node.func)} is not a function returning a field")
        parameters = helper.args.args
        defaults = [None] * (len(parameters) - len(helper.args.defaults)) + list(helper.args.defaults)
        bound = {p.arg: self.constant(helper_source, d) for p, d in zip(parameters, defaults) if d is not None}
        bound.update({p.arg: self.constant(source, a, names) for p, a in zip(parameters, node.args)})
        bound.update({k.arg: self.constant(source, k.value, names) for k in node.keywords})
        returned = [n.value for n in ast.walk(helper) if isinstance(n, ast.Return)]
        if len(returned) != 1:
            raise helper_source.error(helper, f"{helper.name} does not return one field")
        return self.default(helper_source, returned[0], bound)


@functools.lru_cache(maxsize=None)
def _read(folder):
    reader = _Reader(folder)
    entries = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        source = reader.source(path.stem)
        for cls in source.top.values():
            if not (isinstance(cls, ast.ClassDef) and any(ast.unparse(d).split(".")[-1] == "register"
                                                          for d in cls.decorator_list)):
                continue
            values = {}
            for attribute in ("name", "summary", "Options"):
                found = reader.attribute(source, cls, attribute)
                if found is None:
                    raise source.error(cls, f"{cls.name} has no {attribute}")
                values[attribute] = found
            name = reader.constant(*values["name"])
            entries[name] = MethodEntry(name, path.stem, reader.constant(*values["summary"]),
                                        reader.fields(*reader.resolve(*values["Options"])))
    entries = dict(sorted(entries.items()))
    base = reader.source("base")
    return entries, reader.constant(base, base.top["SHARED_OPTIONS"])


def methods():
    """`{name: MethodEntry}` of every registered method, in registry order."""
    return _read(methods_folder())[0]


def shared_options():
    """The options every method that has them takes from the task (`--temperature`, `--alpha`)."""
    return _read(methods_folder())[1]
