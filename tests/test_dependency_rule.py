"""The dependency rule, pinned (docs/development.md, "Layers and the dependency rule").

Lowest layer first; each may import only the layers above it in this list:

- ``tfreg_core``: framework-free runtime. Neither framework, nor tfreg/torchref/tfreg_harness.
- ``tfreg_harness`` (its neutral core): framework-free half of the parity harness. Neither
  framework, nor tfreg/torchref, nor either side of the harness.
- ``tfreg`` (Keras) never imports torch/torchref; ``torchref`` never imports TensorFlow/Keras/tfreg.
  Neither imports the harness' sides.
- ``tfreg_harness.torch_side``: the torch half of the harness (``torchref.verify``), importable
  without TensorFlow: never TensorFlow/Keras/tfreg, nor the Keras side.
- ``tfreg_harness.keras_side`` is the cross-framework harness: it sees both frameworks; so does
  ``tfreg.parity``, the public names re-exported from it.

The old module names kept as aliases of their moved modules (``SHIMS``) are the one exception:
each imports its new home, and nothing else. Two checks: every import statement in the source
(module level, inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency)
against that table, and a fresh interpreter per layer that imports every module and reads
``sys.modules`` (which also catches a dependency pulled in indirectly). A third pins that no
two modules import each other, directly or around a longer circle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("tfreg_core", "tfreg_harness", "tfreg", "torchref")
_TF = frozenset({"tensorflow", "keras", "tf_keras"})
_FRAMEWORKS = _TF | {"torch"}

_KERAS_SIDE = "tfreg_harness.keras_side"
_TORCH_SIDE = "tfreg_harness.torch_side"
_SIDES = frozenset({_KERAS_SIDE, _TORCH_SIDE})

# Module prefix -> module prefixes it must not import; the longest matching prefix applies.
FORBIDDEN: dict[str, frozenset[str]] = {
    "tfreg_core": _FRAMEWORKS | {"tfreg", "torchref", "tfreg_harness"},
    "tfreg_harness": _FRAMEWORKS | {"tfreg", "torchref"} | _SIDES,
    _TORCH_SIDE: _TF | {"tfreg", _KERAS_SIDE},
    _KERAS_SIDE: frozenset(),  # the cross-framework harness
    "tfreg": frozenset({"torch", "torchref"}) | _SIDES,
    "tfreg.parity": frozenset(),  # the public names of the cross-framework harness
    "torchref": _TF | {"tfreg"} | _SIDES,
}
# Old module name -> the moved module it is an alias of (the only import it may make).
SHIMS = {
    "tfreg.architecture": f"{_KERAS_SIDE}.architecture",
    "torchref.architecture": f"{_TORCH_SIDE}.architecture",
    "torchref.verify": f"{_TORCH_SIDE}.verify",
    "tfreg_harness.pytest_plugin": f"{_KERAS_SIDE}.pytest_plugin",
}
# Cycles are checked everywhere but here: the Keras side's circles (kinds <-> registry, the
# checks package <-> its modules) register built-ins on first use.
CYCLES_EXEMPT = (_KERAS_SIDE,)


def _modules() -> dict[str, Path]:
    out = {}
    for package in _PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            parts = path.relative_to(_ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import statement of a module;
    ``from a import b`` names ``a.b`` (a submodule or an attribute: both are looked up as
    prefixes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            nested.update(id(inner) for inner in ast.walk(node) if inner is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(target, node.lineno, id(node) in nested) for target in targets]
    return found


def _layer(module: str) -> str:
    return max((p for p in FORBIDDEN if _within(module, p)), key=len)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_module_imports_a_layer_it_must_not() -> None:
    violations = []
    for module, path in _modules().items():
        forbidden = FORBIDDEN[_layer(module)]
        for target, line, in_function in _imports(module, path):
            if module in SHIMS and target == "sys":
                continue
            if module in SHIMS and _within(target, SHIMS[module]):
                continue
            if module in SHIMS or any(_within(target, f) for f in forbidden):
                where = "inside a function" if in_function else "at module level"
                violations.append(f"{path.relative_to(_ROOT)}:{line}: imports {target} {where}")
    assert violations == []


def test_importing_every_module_loads_no_forbidden_package() -> None:
    """Each layer in a fresh interpreter (all at once: a TensorFlow import takes seconds); a
    layer's shims import their moved module, so that module's side is not forbidden there."""
    modules = _modules()
    layers = [p for p in FORBIDDEN if FORBIDDEN[p]]  # the cross-framework layers forbid nothing
    checks = {
        layer: (
            sorted(m for m in modules if _layer(m) == layer),
            sorted(
                FORBIDDEN[layer]
                - {_layer(new) for old, new in SHIMS.items() if _layer(old) == layer}
            ),
        )
        for layer in layers
    }
    processes = {
        layer: subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import importlib, sys\n"
                f"for name in {names!r}:\n"
                "    importlib.import_module(name)\n"
                f"loaded = sorted(m for m in {forbidden!r} if m in sys.modules)\n"
                "assert not loaded, f'imported {loaded}'\n",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        for layer, (names, forbidden) in checks.items()
    }
    for layer, process in processes.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, f"{layer}: {stderr[-2000:]}"


def test_no_import_cycles() -> None:
    modules = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {
        module: {
            found
            for target, _, _ in _imports(module, path)
            if (found := resolve(target)) not in (None, module)
        }
        for module, path in modules.items()
        if not any(_within(module, p) for p in CYCLES_EXEMPT)
    }
    cycles, done = [], set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycles.append(" -> ".join([*trail[trail.index(module) :], module]))
            return
        if module in done or module not in graph:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []
