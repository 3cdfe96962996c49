"""Imports point one way: parse every module's imports (lazy ones inside functions too) and check the rules.

The stages, bottom to top: config / files / device -> data, model -> checkpoint -> inference (generation) ->
training -> serving, cli. A rule here is a sentence of the README's layering; breaking one fails a test
that names the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "scratchgpt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name lives in (`a.b.c` -> `a.b` when c is not a module); None if external."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported package module, line) for every import statement in `module`, wherever it stands."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` may name a submodule: count it when it is one.
            names = [f"{prefix}.{a.name}" if _resolve(f"{prefix}.{a.name}") == f"{prefix}.{a.name}" else prefix
                     for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.append((target, node.lineno))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _in(module: str, *stages: str) -> bool:
    """Whether `module` is (or lies under) one of `stages`, given without the package prefix."""
    return any(module == f"{PACKAGE}.{s}" or module.startswith(f"{PACKAGE}.{s}.") for s in stages)


def _violations(importer_stages: tuple[str, ...], allowed=None, forbidden=None, exempt: tuple[str, ...] = ()):
    bad = []
    for module, imports in GRAPH.items():
        if not _in(module, *importer_stages) or _in(module, *exempt):
            continue
        for target, line in imports:
            if forbidden is not None:  # a deny-list, with exceptions in `allowed`
                wrong = _in(target, *forbidden) and not (allowed and _in(target, *allowed))
            else:  # an allow-list
                wrong = not _in(target, *allowed)
            if wrong:
                bad.append(f"{MODULES[module].relative_to(SRC)}:{line} imports {target}")
    return bad


def test_the_graph_sees_the_stages():
    # Guards the parser itself: if it stopped finding imports, every rule below would pass vacuously.
    assert {"scratchgpt.model.gpt", "scratchgpt.training.train", "scratchgpt.inference.generate"} <= set(MODULES)
    assert any(t == "scratchgpt.config" for t, _ in GRAPH["scratchgpt.model.gpt"])
    assert any(t == "scratchgpt.training.train" for t, _ in GRAPH["scratchgpt.training.driver"])


def test_model_imports_only_config_and_device():
    # device: what the hardware can do (native bf16, VNNI), which the int8 kernels choose by.
    assert _violations(("model",), allowed=("config", "device", "model")) == []


def test_config_files_and_device_import_nothing_of_the_package():
    assert _violations(("config", "files", "device"), allowed=()) == []


def test_data_imports_no_later_stage():
    assert _violations(("data",), forbidden=("model", "checkpoint", "training", "inference", "eval", "export",
                                             "cli")) == []


def test_checkpoint_imports_no_training_inference_or_cli():
    assert _violations(("checkpoint",), forbidden=("training", "inference", "eval", "export", "cli")) == []


def test_inference_imports_no_training():
    # Serving and `scratchgpt chat` must start without the training stack.
    assert _violations(("inference",), forbidden=("training", "eval", "export", "cli")) == []


def test_training_imports_no_serving():
    # Modes may generate (samples, test responses); nothing in training serves.
    assert _violations(("training",), forbidden=("inference", "cli"), allowed=("inference.generate",)) == []


def test_the_loop_imports_no_mode_and_no_generation():
    loop = ("training.train", "training.runtime", "training.runlog", "training.run_state", "training.driver",
            "training.finetune", "training.lora", "training.optim")
    assert _violations(loop, forbidden=("training.modes", "inference", "eval", "export", "cli")) == []


def test_eval_and_export_import_no_cli_or_serving():
    assert _violations(("eval", "export"), forbidden=("cli", "inference.serve")) == []


def test_only_the_entry_points_import_cli():
    importers = sorted(m for m, imps in GRAPH.items() if any(t == f"{PACKAGE}.cli" for t, _ in imps))
    assert set(importers) <= {f"{PACKAGE}.__main__"}
    # The rest of the cli package (its flags and commands) is the CLI's own: nothing else imports it.
    outside = sorted(m for m, imps in GRAPH.items() if not _in(m, "cli") and any(_in(t, "cli") for t, _ in imps))
    assert set(outside) <= {f"{PACKAGE}.__main__"}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _ in GRAPH[v]}:
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
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


@pytest.mark.parametrize("rule", ["model", "inference"])
def test_the_rules_catch_a_violation(rule, monkeypatch):
    # The checks can fail: an upward import planted in the graph is reported, and so is a cycle.
    planted = {"model": ("scratchgpt.model.gpt", "scratchgpt.checkpoint"),
               "inference": ("scratchgpt.inference.generate", "scratchgpt.training.train")}[rule]
    monkeypatch.setitem(GRAPH, planted[0], [*GRAPH[planted[0]], (planted[1], 1)])
    if rule == "model":
        assert _violations(("model",), allowed=("config", "model"))
        assert any("scratchgpt.model.gpt" in c for c in _cycles())
    else:
        assert _violations(("inference",), forbidden=("training",))


def test_the_servers_parts_point_one_way():
    # serve -> openai_api -> batching: the decoder knows no protocol, the protocol no app.
    server_parts = ("inference.openai_api", "inference.serve", "inference.connection")
    assert _violations(("inference.batching",), forbidden=server_parts) == []
    assert _violations(("inference.openai_api", "inference.connection"), forbidden=("inference.serve",)) == []
