"""The import rules the architecture promises, checked on the source (not by convention):
cluster/ never imports router/, model code never imports ray, torch.distributed or cluster/, and the contracts
the scheduler and workers share carry no torch."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imported_modules(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included); relative imports
    resolved against the file's package."""
    package = path.parent.relative_to(root).as_posix().split("/")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def offenders(folder: str, forbidden: tuple[str, ...], root: pathlib.Path = ROOT) -> list[str]:
    return sorted(f"{p.relative_to(root)} imports {m}" for p in (root / folder).rglob("*.py")
                  for m in imported_modules(p, root) if m.split(".")[0] in forbidden or m in forbidden)


def test_cluster_never_imports_the_router():
    assert offenders("cluster", ("router",)) == []


@pytest.mark.parametrize("folder", ["model_shards", "kernels"])
def test_model_code_knows_nothing_of_ray_or_torch_distributed(folder):
    assert offenders(folder, ("ray", "torch.distributed", "cluster")) == []


def test_the_offender_finder_sees_function_local_and_relative_imports(tmp_path):
    """What a broken checker would miss: an import inside a function, and `from ..router import x`;
    `from . import contracts` inside cluster/ is no offence."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "probe.py").write_text(
        "from . import contracts\ndef f():\n    import router.engine\n    from ..router import scheduler\n")
    assert offenders("cluster", ("router",), root=tmp_path) == [
        "cluster/probe.py imports router", "cluster/probe.py imports router.engine"]


@pytest.mark.parametrize("module", ["cluster.contracts", "cluster.executor", "router.scheduler"])
def test_contracts_and_scheduler_import_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


def test_every_executor_offers_the_engine_interface():
    from cluster.executor import Executor
    from cluster.local_executor import LocalExecutor
    from cluster.process_executor import ProcessExecutor
    from cluster.ray_executor import RayExecutor
    for cls in (LocalExecutor, ProcessExecutor, RayExecutor):
        missing = [name for name in ("submit", "is_fatal", "rebuild", "shutdown") if not callable(getattr(cls, name, None))]
        assert missing == [], f"{cls.__name__} lacks {missing}"
    assert not isinstance(object(), Executor)
