"""Arrows point down: every import of the package's own modules is checked against the layer order that
the README's development section documents (a module imports only from layers below it, or from its own
package at its layer or below; no stage imports another stage), and a function-local import of the
package's own modules is kept for those that load torch or transformers when imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "constitutional"

# Lowest first. A module's layer is its own entry, else its package's (``evaluation`` holds modules of
# several layers: the pure readers of answers sit low, the judges that call the feedback model above it).
LAYERS = [
    ["errors"],
    ["typed", "wheels", "distributed", "progress"],
    ["records"],
    ["models", "constitution", "prompt_sources"],
    ["backends", "serve", "evaluation.detectors", "evaluation.rubric", "evaluation.elo", "evaluation.snapshots",
     "evaluation.jailbreaks", "evaluation.agreement", "evaluation.plots", "evaluation.graded"],
    ["prompts", "evaluation.verdicts", "evaluation.targets", "evaluation.effect"],
    ["feedback"],
    ["judge_pairs", "rewards", "training", "ppo", "evaluation.judges", "evaluation.second_opinion"],
    ["config"],
    ["stages"],
    ["pipeline", "report", "chat"],
    ["cli"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "accelerate", "matplotlib", "safetensors"}
# loaded only when used: numpy and gguf come with the heavy ones; tensorboard is an optional extra
OPTIONAL = {"numpy", "gguf", "tensorboard"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def own(target: str) -> str | None:
    """The package module an import names (``constitutional.x.y`` or a symbol in it), without the prefix."""
    name = target.removeprefix("constitutional").lstrip(".")
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def rank(module: str) -> int:
    name = module
    while name not in RANK:
        if "." not in name:
            raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")
        name = name.rpartition(".")[0]
    return RANK[name]


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported package module, line, at module level) for every import of the package's own modules."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("constitutional"):
            targets = [own(f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [own(a.name) for a in node.names if a.name.startswith("constitutional")]
        else:
            continue
        out += [(t, node.lineno, id(node) in top) for t in targets if t]
    return out


def heavy_modules() -> set[str]:
    """Modules that import torch, transformers, ... when imported (directly or through another module)."""
    direct = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        libs = {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
        libs |= {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        direct[module] = (libs & HEAVY, {t for t, _, at_top in imports(module) if at_top})
    heavy = {m for m, (libs, _) in direct.items() if libs}
    while True:
        more = {m for m, (_, deps) in direct.items() if deps & heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "stages" and len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m))
def test_each_import_points_down(module):
    wrong = []
    for target, line, _ in imports(module):
        same_package = module.split(".")[0] == target.split(".")[0]
        if rank(target) > rank(module) or (rank(target) == rank(module) and not same_package):
            wrong.append(f"line {line}: {target} (layer {rank(target)}) from layer {rank(module)}")
        if stage_of(module) and stage_of(target) and stage_of(target) != stage_of(module):
            wrong.append(f"line {line}: stage {stage_of(module)} imports stage {stage_of(target)}")
    assert not wrong, f"{module} imports upward or across: " + "; ".join(wrong)


def test_function_local_imports_of_the_package_are_only_of_heavy_modules():
    heavy = heavy_modules()
    assert {"backends.hf", "ppo"} <= heavy and "config" not in heavy and "cli" not in heavy
    local = [f"{module}:{line} imports {target}" for module in MODULES if module
             for target, line, at_top in imports(module) if not at_top and target not in heavy]
    assert not local, "import these at the top of the module (they load nothing heavy): " + "; ".join(local)


def test_function_local_imports_are_only_of_heavy_libraries():
    """Outside the package too: torch, transformers, TRL, PEFT and the like load in the function that needs
    them; everything else (the standard library, jinja2, yaml, tqdm) sits at the top of the module."""
    local = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import) and id(node) not in top:
                names = [a.name for a in node.names]
            else:
                continue
            local += [f"{module}:{node.lineno} {n}" for n in names
                      if not n.startswith("constitutional") and n.split(".")[0] not in HEAVY | OPTIONAL]
    assert not local, "import these at the top of the module: " + "; ".join(local)


def test_the_layer_check_catches_an_upward_and_a_cross_stage_import():
    assert rank("config") > rank("feedback") > rank("backends.openai") > rank("errors")
    assert rank("evaluation.detectors") < rank("prompts") < rank("evaluation.judges")
    assert stage_of("stages.rl.dpo") == "stages.rl" != stage_of("stages.pm")
    assert own("constitutional.stages.label_eval.load_eval_pairs") == "stages.label_eval"


def test_the_scripts_beside_the_package_import_only_modules_that_exist():
    """bench/ and tools/ are not imported by the tests; a module renamed in src/ must not leave them broken."""
    import importlib
    import importlib.util

    missing = []
    for folder in ("bench", "tools"):
        for script in sorted((SRC.parents[1] / folder).glob("*.py")):
            for node in ast.walk(ast.parse(script.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("constitutional")):
                    continue
                try:
                    module = importlib.import_module(node.module)
                except ModuleNotFoundError:
                    missing.append(f"{script.name}:{node.lineno} {node.module}")
                    continue
                missing += [f"{script.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, "imports of names that do not exist: " + "; ".join(missing)
