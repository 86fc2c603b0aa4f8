"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu) hold what the server needs.

No Docker engine runs here, so the build itself is not run; instead the build context the Dockerfiles
COPY from (after .dockerignore) is laid out in a folder, and the server's code is imported and the
default checkpoint resolved from there alone: a module or folder the images forget fails this test.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu"]


def copies(dockerfile: str) -> list[str]:
    """Sources of the Dockerfile's COPY instructions (relative to the build context, the repo root)."""
    out = []
    for line in (ROOT / dockerfile).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            out += [p.rstrip("/") for p in parts[1:-1]]
    return out


def ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/"))
               or any(fnmatch.fnmatch(part, p.removeprefix("**/")) for part in Path(rel).parts)
               or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def lay_out_context(dockerfile: str, dest: Path) -> None:
    patterns = dockerignore()
    for src in copies(dockerfile):
        path = ROOT / src
        assert path.exists(), f"{dockerfile}: COPY {src}: no such path"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = str(f.relative_to(ROOT))
            if not ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / rel)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = dockerignore()
    for rel in (".venv/bin/python", ".git/HEAD", "router/__pycache__/cli.cpython-311.pyc", "tests/unit/x.py"):
        assert ignored(rel, patterns), rel
    for rel in ("router/cli.py", "checkpoints/hybrid-mini/config.json", "pyproject.toml"):
        assert not ignored(rel, patterns), rel


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_copies_every_package_the_project_installs(dockerfile):
    text = (ROOT / "pyproject.toml").read_text()
    packages = text.split('include = [')[1].split(']')[0].replace('"', "").replace("*", "").split(", ")
    copied = set(copies(dockerfile))
    assert {p.strip() for p in packages} <= copied, f"{dockerfile} misses {set(packages) - copied}"
    assert {"pyproject.toml", "checkpoints"} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_installs_the_project_as_the_readme_does_and_runs_hybridserve(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert "pip install -c constraints.txt -e ." in text or "pip install -e '.[gpu]'" in text
    assert 'CMD ["hybridserve", "serve", "--host", "0.0.0.0"]' in text
    assert "wget" in text                       # KubeRay's injected probes call wget in the Ray containers
    if "gpu" in dockerfile:
        assert text.startswith("#") and "FROM nvidia/cuda:" in text and "'.[gpu]'" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_server_imports_and_finds_its_default_model_from_the_image_contents_alone(dockerfile, tmp_path):
    lay_out_context(dockerfile, tmp_path)
    probe = ("import router, router.cli, router.serve_app, cluster.actors, model_shards.model, kernels.ops\n"
             "from router.engine_config import resolve_checkpoint\n"
             "assert router.__file__.startswith(%r), router.__file__\n"
             "print(resolve_checkpoint('default'))\n"
             "router.cli.build_parser().parse_args(['serve'])\n" % str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "checkpoints" / "hybrid-mini")
