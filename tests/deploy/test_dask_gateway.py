"""The dask-gateway scheduler sidecar recipe, rendered by dask-gateway-server's own code.

deploy/dask-gateway/values-scheduler-sidecar.yaml is Helm values for the dask-gateway chart;
its ``extraPodConfig`` becomes ``KubeClusterConfig.scheduler_extra_pod_config``. The scheduler
pod is built here by the gateway's Kubernetes controller (``KubeController.make_pod``, from
dask-gateway-server on PyPI, which merges the extra config and appends to lists), not by hand.
The pod must validate, the exporter container must come after the scheduler's with its port
and the gateway's credential volume; and its arguments, with credentials made by the gateway's
own ``new_keypair``, must reach a real TLS scheduler configured as the pod's scheduler is. The
PodMonitor of the recipe must select that pod and label it with the gateway's cluster name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dask_gateway_server.backends.kubernetes.backend import KubeClusterConfig
from dask_gateway_server.backends.kubernetes.controller import KubeController, get_cluster_key
from dask_gateway_server.tls import new_keypair
from distributed import Scheduler, Worker
from distributed.security import Security

from dask_memory_exporter import names as n
from dask_memory_exporter.cli import build_parser
from dask_memory_exporter.config import Settings, load_settings
from tests.deploy.test_manifests import _crd_schemas
from tests.support.live import by_worker_name, free_port, scalar, serve_exporter

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deploy" / "dask-gateway" / "values-scheduler-sidecar.yaml"
BIN = Path(sys.executable).parent
CREDENTIALS = "/etc/dask-credentials/"  # where the gateway's controller mounts the Secret


def extra_pod_config() -> dict[str, Any]:
    values = yaml.safe_load(VALUES.read_text())
    config = values["gateway"]["backend"]["scheduler"]["extraPodConfig"]
    assert isinstance(config, dict)
    return config


def scheduler_pod() -> dict[str, Any]:
    """The scheduler pod of cluster ``abc`` in namespace ``dask``, as the controller makes it."""
    controller = KubeController(api_url="http://api.dask-gateway:8000/api", gateway_instance="gw")
    config = KubeClusterConfig(
        scheduler_extra_pod_config=extra_pod_config(),
        image="ghcr.io/dask/dask-gateway:2026.3.0",
    )
    pod = controller.make_pod("dask", "abc", config)
    assert isinstance(pod, dict)
    return pod


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def exporter_settings(args: list[str], **overrides: Any) -> Settings:
    parsed = build_parser().parse_args(["serve", *args])
    return load_settings(overrides, cli=parsed.settings_source(parsed_args=parsed))


def test_the_exporter_is_appended_beside_the_scheduler_with_the_gateway_credentials() -> None:
    pod = scheduler_pod()
    assert [c["name"] for c in pod["spec"]["containers"]] == ["dask-scheduler", "memory-exporter"]
    exporter = containers(pod)["memory-exporter"]
    assert exporter["ports"] == [
        {"name": "memory-metrics", "containerPort": 9787, "protocol": "TCP"}
    ]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # The gateway's own credential volume is kept (lists are appended to, not replaced).
    assert volumes["dask-credentials"]["secret"]["secretName"] == "dask-credentials-abc"
    mounts = {m["name"]: m for m in exporter["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    assert mounts["dask-credentials"] == {
        "name": "dask-credentials",
        "mountPath": CREDENTIALS,
        "readOnly": True,
    }
    # The scheduler container is untouched and listens where the exporter looks for it.
    scheduler = containers(pod)["dask-scheduler"]
    args = scheduler["args"]
    assert args[args.index("--protocol") + 1] == "tls"
    assert args[args.index("--port") + 1] == "8786"
    settings = exporter_settings(exporter["args"])
    assert settings.scheduler == "tls://127.0.0.1:8786"
    env = {e["name"]: e["value"] for e in scheduler["env"]}
    assert settings.tls_ca_file == env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]
    assert settings.tls_cert == env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT"]
    assert settings.tls_key == env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY"]
    for path in (settings.tls_ca_file, settings.tls_cert, settings.tls_key):
        assert path is not None and path.startswith(CREDENTIALS)
    assert settings.listen_port == 9787


@pytest.mark.parametrize("version", ("1.25.0", "1.37.0"))
def test_the_rendered_pod_validates_strict(version: str, tmp_path: Path) -> None:
    rendered = tmp_path / "pod.yaml"
    pod = scheduler_pod()
    pod["metadata"]["namespace"] = "dask"
    rendered.write_text(yaml.safe_dump(pod))
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " passed for resource " in out, out


async def test_the_sidecar_arguments_reach_a_scheduler_set_up_as_the_gateway_does(
    tmp_path: Path,
) -> None:
    """Credentials from the gateway's new_keypair, the scheduler's TLS from the pod's env."""
    cert, key = new_keypair("abc")
    (tmp_path / "dask.crt").write_bytes(cert)
    (tmp_path / "dask.pem").write_bytes(key)
    pod = scheduler_pod()
    env = {e["name"]: e["value"] for e in containers(pod)["dask-scheduler"]["env"]}

    def local(path: str) -> str:  # the Secret's mount point, here a temporary directory
        return str(tmp_path / Path(path).relative_to(CREDENTIALS))

    security = Security(
        tls_ca_file=local(env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]),
        tls_scheduler_cert=local(env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT"]),
        tls_scheduler_key=local(env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY"]),
        tls_worker_cert=local(env["DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT"]),
        tls_worker_key=local(env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"]),
        require_encryption=True,
    )
    port = free_port()
    args = [
        a.replace(CREDENTIALS, str(tmp_path) + "/").replace(":8786", f":{port}")
        for a in containers(pod)["memory-exporter"]["args"]
    ]
    settings = exporter_settings(args)
    scheduler = await Scheduler(
        host="127.0.0.1", port=port, protocol="tls", security=security, dashboard=False
    )
    worker = await Worker(
        settings.scheduler, name="gw-worker", security=security, nthreads=1, host="127.0.0.1"
    )
    try:
        async with serve_exporter(
            scheduler=settings.scheduler,
            tls_ca_file=settings.tls_ca_file,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        ) as ex:
            s = await ex.wait_for(
                lambda s: "gw-worker" in by_worker_name(s, n.WORKER_PROCESS_BYTES),
                what="the worker through the gateway's credentials",
            )
            assert scalar(s, n.SCHEDULER_UP) == 1
    finally:
        await worker.close()
        await scheduler.close()


def test_the_podmonitor_selects_the_rendered_pod_and_names_its_cluster() -> None:
    """Valid against the PodMonitor CRD; its selector matches the pod's labels, its port is the
    exporter's, and its relabelling builds the gateway's cluster name NAMESPACE.NAME."""
    monitor = yaml.safe_load((ROOT / "deploy" / "dask-gateway" / "podmonitor.yaml").read_text())
    (schema,) = _crd_schemas()["PodMonitor"].values()
    jsonschema.validate(monitor, schema)
    pod = scheduler_pod()
    labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in containers(pod)["memory-exporter"]["ports"]}
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "cluster"]
    meta = {
        "__meta_kubernetes_namespace": "dask",
        "__meta_kubernetes_pod_label_gateway_dask_org_cluster": labels["gateway.dask.org/cluster"],
    }
    assert relabel["separator"].join(meta[s] for s in relabel["sourceLabels"]) == "dask.abc"
    # ... the key the gateway's own controller gives the pod's cluster (its API's name for it)
    pod["metadata"]["namespace"] = "dask"
    assert get_cluster_key(pod) == "dask.abc"
