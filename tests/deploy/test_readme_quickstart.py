"""The README's Kubernetes quick start, run as written: its shell blocks, in order.

The blocks are read from README.md (the "Kubernetes quick start" section), not copied here, so
an edit to the README is what gets tested. They run with ``sh -e`` in a scratch copy of the
repository (the Dockerfile and deploy/), the way a reader runs them from a clone's root: the
build, then route A (kustomize) or route B (Helm), each from a fresh copy.

What cannot run here is stood in for, and only that: ``docker`` (no daemon, no registry; the
image itself is built and run with podman in test_image.py) records its arguments and checks
that it runs where the Dockerfile is; ``kubectl apply -k DIR`` (no API server) renders DIR with
the real ``kubectl kustomize`` and keeps what it would have applied; ``helm`` (the chart
repository is unreachable) feeds a representative rendering of the Dask chart
(fixtures/helm-dask-chart.yaml) to the ``--post-renderer`` program it is given, as Helm does,
with the same environment. ``kubectl kustomize`` is the real one. The manifests that would be
applied must carry the image the reader pushed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIXTURE = Path(__file__).parent / "fixtures" / "helm-dask-chart.yaml"
IMAGE = "REGISTRY/dask-memory-exporter:0.1.0"
OVERLAY_COMMENT = "# or worker-sidecar, dask-operator, servicemonitor"

DOCKER = """#!/bin/sh
# stand-in for docker: no daemon here. Records the call; a build must run beside a Dockerfile.
echo "docker $*" >>"$QUICKSTART_LOG"
if [ "$1" = build ]; then test -f Dockerfile || { echo "no Dockerfile in $PWD" >&2; exit 1; }; fi
"""
KUBECTL = """#!/bin/sh
# kubectl without an API server: `apply -k DIR` renders DIR for real and keeps the result.
echo "kubectl $*" >>"$QUICKSTART_LOG"
if [ "$1" = apply ] && [ "$2" = -k ]; then
    exec "$REAL_KUBECTL" kustomize "$3" >"$QUICKSTART_APPLIED"
fi
if [ "$1" = apply ]; then echo "stand-in supports apply -k only" >&2; exit 1; fi
exec "$REAL_KUBECTL" "$@"
"""
HELM = """#!/bin/sh
# helm without a chart repository or a cluster: install hands the chart's rendering (a fixture)
# to the --post-renderer program, as helm does, and keeps what it prints.
echo "helm $*" >>"$QUICKSTART_LOG"
case "$1" in
repo) exit 0 ;;
install)
    renderer=''
    while [ $# -gt 0 ]; do
        if [ "$1" = --post-renderer ]; then renderer=$2; fi
        shift
    done
    if [ -n "$renderer" ]; then
        "$renderer" <"$HELM_CHART_RENDERING" >"$QUICKSTART_APPLIED"
    else
        cp "$HELM_CHART_RENDERING" "$QUICKSTART_APPLIED"
    fi ;;
*) echo "stand-in supports repo and install only" >&2; exit 1 ;;
esac
"""


def quickstart_blocks() -> list[str]:
    """The ```sh blocks of the README's "Kubernetes quick start" section, in order."""
    text = README.read_text()
    start = text.index("### Kubernetes quick start")
    end = text.find("\n#", start + 1)
    section = text[start : end if end != -1 else None]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_the_section_has_a_build_and_two_routes() -> None:
    build, kustomize, helm = quickstart_blocks()
    assert "docker build" in build and "docker push" in build
    assert "kubectl apply -k" in kustomize and OVERLAY_COMMENT in kustomize
    assert "helm install" in helm and "--post-renderer" in helm
    # no `cd` that would leave a later relative path pointing elsewhere
    assert not any(re.search(r"^\s*cd\s", b, re.M) for b in (build, kustomize, helm))


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl not found: ./dev test installs it (ensure_kubectl)"
    return kubectl


def run_blocks(tmp: Path, *blocks: str) -> tuple[str, list[dict[str, object]]]:
    """Run ``blocks`` one after the other in a scratch clone; (the calls, what was applied)."""
    clone = tmp / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "Dockerfile", clone)
    shutil.copytree(ROOT / "deploy", clone / "deploy")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, script in (("docker", DOCKER), ("kubectl", KUBECTL), ("helm", HELM)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    log, applied = tmp / "calls.log", tmp / "applied.yaml"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "REAL_KUBECTL": _kubectl(),
        "QUICKSTART_LOG": str(log),
        "QUICKSTART_APPLIED": str(applied),
        "HELM_CHART_RENDERING": str(FIXTURE),
    }
    for block in blocks:
        proc = subprocess.run(
            ["sh", "-e", "-c", block], cwd=clone, env=env,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{block}\n--- stderr:\n{proc.stderr}"
    assert applied.exists(), "nothing was applied"
    docs = [d for d in yaml.safe_load_all(applied.read_text()) if d]
    return log.read_text(), docs


def images(docs: list[dict[str, object]]) -> set[str]:
    return set(re.findall(r"'image': '([^']+)'", repr(docs)))


def exporter_images(docs: list[dict[str, object]]) -> set[str]:
    return {i for i in images(docs) if "dask-memory-exporter" in i}


@pytest.mark.parametrize(
    "overlay", ["scheduler-sidecar", "worker-sidecar", "dask-operator", "servicemonitor"]
)
def test_route_a_kustomize(tmp_path: Path, overlay: str) -> None:
    build, kustomize, _ = quickstart_blocks()
    # as written for scheduler-sidecar; the comment's alternatives by changing that one word
    block = kustomize.replace("overlays/scheduler-sidecar", f"overlays/{overlay}")
    calls, docs = run_blocks(tmp_path, build, block)
    assert f"docker build -t {IMAGE} ." in calls and f"docker push {IMAGE}" in calls
    assert "kubectl kustomize my-dask" in calls
    assert exporter_images(docs) == {IMAGE}
    kinds = {str(d["kind"]) for d in docs}
    assert "PrometheusRule" in kinds
    assert kinds & {"PodMonitor", "ServiceMonitor"}


def test_route_b_helm(tmp_path: Path) -> None:
    build, _, helm = quickstart_blocks()
    calls, docs = run_blocks(tmp_path, build, helm)
    assert "helm repo add dask https://helm.dask.org" in calls
    assert exporter_images(docs) == {IMAGE}
    scheduler = [d for d in docs if d["kind"] == "Deployment" and "scheduler" in str(d["metadata"])]
    containers = repr(scheduler)
    assert "memory-exporter" in containers and IMAGE in containers
    assert any(d["kind"] == "PodMonitor" for d in docs)
