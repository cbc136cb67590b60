"""The package's import structure: no module imports another that (through any chain) imports it back, the
pool's side reads the linear-method registry without importing torch, and what is derived from the
registry (the TOML template's comment) says what the registry says."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "glmpool"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """glmpool modules `path` imports anywhere in its body (functions included), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found - {name}


def test_no_import_circle_in_the_package():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    # a package's __init__ is imported with each of its modules: count that edge too, unless it imports nothing
    for name in modules:
        parent = name.rpartition(".")[0]
        if parent in graph and graph[parent]:
            graph[name].add(parent)
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import circle: " + " -> ".join(path + [name, target])
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "glmpool.engine.linear.base" in graph["glmpool.engine.api"]  # the graph is what it seems


def test_the_pool_reads_the_method_registry_without_torch():
    code = ("import sys; import glmpool.supervisor, glmpool.cli, glmpool.config, glmpool.engine.linear.registry; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


def test_the_toml_template_and_the_help_describe_every_matmul_method():
    from glmpool import config
    from glmpool.engine.linear import registry
    assert registry.matmul_comment() in (ROOT / "deploy" / "glmpool.toml").read_text()
    help_text = config.BY_NAME["matmul"].help
    assert all(f"'{name}'" in help_text for name in registry.MATMULS)
    assert config.BY_NAME["matmul"].default == registry.DEFAULT_MATMUL


def test_the_toml_template_and_the_help_describe_the_quantized_activations():
    from glmpool import config
    from glmpool.engine.linear import registry
    assert registry.quantized_activations_comment() in (ROOT / "deploy" / "glmpool.toml").read_text()
    setting = config.BY_NAME["quantized_activations"]
    assert setting.default == registry.DEFAULT_QUANTIZED_ACTIVATIONS
    assert [setting.parse(kind) for kind in registry.QUANTIZED_ACTIVATIONS] == list(registry.QUANTIZED_ACTIVATIONS)
