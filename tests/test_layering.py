"""The arrows point down: no method, loss or evaluation imports the training loop, config.py knows no
method, data knows no method, and the core knows no command line. Read from the source (every import
statement, lazy ones inside functions included), not from what happens to be imported at run time."""

import ast
from pathlib import Path

import selfsup

PKG = Path(selfsup.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute ``selfsup.*`` names of every import in ``path`` (relative imports resolved)."""
    package = ["selfsup", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("selfsup")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("selfsup"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import get_method` / `from .. import train`
    return out


def modules_under(*parts: str) -> list[Path]:
    root = PKG.joinpath(*parts)
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


def imports_of(*parts: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PKG)): imported_modules(p) for p in modules_under(*parts)}


def offenders(files: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{f} imports {m}" for f, mods in files.items() for m in mods
                  if any(m == x or m.startswith(x + ".") for x in forbidden))


def test_the_resolver_sees_lazy_and_relative_imports(tmp_path):
    # the checker itself: a lazy relative import of the loop inside a function is found
    src = PKG / "methods" / "distill.py"
    mods = imported_modules(src)
    assert "selfsup.run" in mods and "selfsup.methods.base" in mods  # `from ..run import ...` (lazy), `from .base`
    assert "selfsup.train" not in mods


def test_no_method_loss_or_evaluation_imports_the_loop():
    files = {**imports_of("methods"), **imports_of("losses.py"), **imports_of("evaluate"),
             **imports_of("report"), **imports_of("export.py"), **imports_of("run.py"),
             **imports_of("checkpoint.py"), **imports_of("data")}
    assert offenders(files, ("selfsup.train", "selfsup.cli", "selfsup.demo")) == []


def test_config_knows_no_method_and_data_knows_no_method():
    files = {**imports_of("config.py"), **imports_of("data"), **imports_of("run.py"), **imports_of("checkpoint.py")}
    assert offenders(files, ("selfsup.methods", "selfsup.configure", "selfsup.train")) == []


def test_the_core_knows_no_command_line():
    core = {f: m for f, m in imports_of(".").items() if f not in ("cli.py", "__main__.py")}
    assert offenders(core, ("selfsup.cli",)) == []
