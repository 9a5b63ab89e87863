"""The rooms and their doors: who may import whom (docs/ARCHITECTURE.md).

Read from the source with ``ast`` (nothing is imported), so a wrong import
fails here whatever path the code takes at run time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg.replace(".", "/")).rglob("*.py"))


def test_model_imports_nothing_from_server():
    bad = [(p.name, m) for p in sources("model") for m, _ in imports_of(p) if m.split(".")[0] == "server"]
    assert not bad, bad


@pytest.mark.parametrize("room", ["server.engine", "server.budget", "server.ipc", "server.watch"])
def test_engine_and_budget_know_no_http(room):
    bad = [(str(p.relative_to(ROOT)), m) for p in sources(room) for m, _ in imports_of(p)
           if m.split(".")[0] in ("fastapi", "starlette", "uvicorn") or m.startswith("server.http")]
    assert not bad, bad


def test_only_the_cli_imports_the_http_room():
    outside = [p for p in sources("server") if "http" not in p.relative_to(ROOT).parts and p.name != "cli.py"]
    bad = [(p.name, m) for p in outside for m, _ in imports_of(p) if m.startswith("server.http")]
    assert not bad, bad


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for p in sources("model", "server", "loadtest"):
        for mod, names in imports_of(p):
            if mod.split(".")[0] in ("model", "server", "loadtest"):
                bad += [(str(p.relative_to(ROOT)), mod, n) for n in names if n.startswith("_")]
    assert not bad, bad


def test_scheduler_and_controller_import_no_torch():
    code = ("import sys, server.engine.scheduler, server.budget.controller, server.budget.keeper, model.curve, "
            "server.engine.audit, server.watch.monitor; "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_an_http_worker_imports_no_torch():
    """Under ``msdnet serve --workers N`` only the engine process holds the model:
    everything a worker imports (the CLI module is re-imported by spawn) is torch-free."""
    code = ("import sys, server.cli, server.http.app, server.http.routes, server.http.v2, server.ipc.client; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_file_is_over_400_lines_without_a_reason():
    # A reason is a line "# long file: <why>" near the top.
    long = []
    for p in sources("model", "server", "loadtest"):
        lines = p.read_text().splitlines()
        if len(lines) > 400 and not any(line.startswith("# long file:") for line in lines[:40]):
            long.append((str(p.relative_to(ROOT)), len(lines)))
    assert not long, long


def allowed_imports() -> dict[str, tuple[str, ...]]:
    """docs/ARCHITECTURE.md's rooms table: room -> the project modules its "may import" cell lists."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("| room | holds | may import |"):].split("\n\n")[0].splitlines()[2:]
    rules = {}
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rooms = re.findall(r"`([\w.]+)`", cells[0])
        allowed = tuple(re.findall(r"`([\w.]+)`", cells[2]))
        rules |= {room: allowed for room in rooms}
    return rules


def room_of(module: str, rules: dict) -> str | None:
    """The longest room in ``rules`` that ``module`` is, or is inside."""
    found = [r for r in rules if module == r or module.startswith(r + ".")]
    return max(found, key=len) if found else None


def project_imports(path: Path) -> list[str]:
    """This project's modules ``path`` imports (``from server import errors`` is ``server.errors``)."""
    out = []
    for mod, names in imports_of(path):
        if mod in ("server", "model"):
            out += [f"{mod}.{n}" for n in names]
        elif mod.split(".")[0] in ("server", "model"):
            out.append(mod)
    return out


def test_every_project_import_is_one_the_architecture_doc_allows():
    rules = allowed_imports()
    assert {"model", "server.engine", "server.budget", "server.http", "server.ipc", "server.cli"} <= set(rules)
    bad, unplaced = [], []
    for path in sources("model", "server"):
        room = room_of(module_name(path), rules)
        if room is None:
            unplaced.append(module_name(path))
            continue
        for target in project_imports(path):
            if room_of(target, {room: ()}) == room:
                continue  # inside its own room
            if not any(target == a or target.startswith(a + ".") for a in rules[room]):
                bad.append((module_name(path), target))
    assert not unplaced, f"modules in no room of docs/ARCHITECTURE.md: {unplaced}"
    assert not bad, f"imports docs/ARCHITECTURE.md does not allow: {bad}"


def test_the_http_room_reaches_the_engine_core_and_client_only_where_it_picks_one():
    picks = [(module_name(p), t) for p in sources("server.http") for t in project_imports(p)
             if t.startswith(("server.engine.service", "server.ipc.client")) and p.name != "app.py"]
    assert not picks, picks
