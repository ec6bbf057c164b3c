"""Podman with no daemon, no registry and no systemd: what the image test needs, set up once.

The machine reaches package registries only, so no public base image can be pulled. Instead a
minimal Debian bookworm with Python 3 is bootstrapped with ``debootstrap`` and imported as
``localhost/bookworm-python:local``; the Dockerfile's ``BASE`` build argument points at it.
Podman runs with the vfs storage driver, cgroupfs and a file events logger, all under one cache
directory (``$DME_PODMAN_CACHE``, default ``/var/tmp/dask-memory-exporter-podman``) that
survives test runs, so the base is bootstrapped once per machine.

Missing tools (podman, runc, debootstrap) are installed with apt-get when running as root, as CI
does; otherwise the image test fails with the reason. Run
``python tests/deploy/podman_support.py`` to prepare by hand.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("DME_PODMAN_CACHE", "/var/tmp/dask-memory-exporter-podman"))
BASE_IMAGE = "localhost/bookworm-python:local"


def _apt_mirror() -> str:
    """The Debian archive this machine's apt already uses (``$DME_DEBIAN_MIRROR`` overrides).

    Reading it from apt's own sources keeps the bootstrap on the mirror the machine is set up
    to reach, rather than naming one here.
    """
    if os.environ.get("DME_DEBIAN_MIRROR"):
        return os.environ["DME_DEBIAN_MIRROR"]
    uris: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                uris += line.split()[1:]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                uris.append(parts[2] if parts[1].startswith("[") else parts[1])
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise Unavailable("no Debian archive in /etc/apt sources; set DME_DEBIAN_MIRROR")


APT_PACKAGES = ("podman", "runc", "debootstrap")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
runtime = "runc"
tmp_dir = "{root}/tmp"
"""


class Unavailable(RuntimeError):
    """Podman cannot be set up here (not root, apt or debootstrap failed): the reason."""


def missing_tools() -> list[str]:
    return [t for t in APT_PACKAGES if shutil.which(t) is None]


def ensure_tools() -> None:
    """apt-get install podman, runc and debootstrap if any is missing (root only)."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(missing)} and not root to apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    if missing_tools():
        raise Unavailable(f"still missing after apt-get: {', '.join(missing_tools())}")


def podman_env() -> dict[str, str]:
    """Environment pointing podman at the cache's storage.conf and containers.conf."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "tmp").mkdir(exist_ok=True)
    storage = CACHE / "storage.conf"
    containers = CACHE / "containers.conf"
    storage.write_text(STORAGE_CONF.format(root=CACHE))
    containers.write_text(CONTAINERS_CONF.format(root=CACHE))
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(storage),
        "CONTAINERS_CONF": str(containers),
    }


def podman(
    args: Sequence[str], *, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman --runtime runc ARGS`` with the cache's configuration."""
    cmd = ["podman", "--runtime", "runc", *args]
    proc = subprocess.run(
        cmd, env=podman_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def image_exists(ref: str) -> bool:
    return podman(["image", "exists", ref], check=False).returncode == 0


@contextmanager
def _lock() -> Iterator[None]:
    """Serialise bootstraps between concurrent test runs on one machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_base_image() -> str:
    """Bootstrap and import the local Debian + Python base unless podman already has it."""
    ensure_tools()
    with _lock():
        if image_exists(BASE_IMAGE):
            return BASE_IMAGE
        if os.geteuid() != 0:
            raise Unavailable("debootstrap needs root")
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as rootfs:
            # mkdtemp makes the directory 0700, and it becomes the image's "/": open it up,
            # or a non-root user cannot even reach /bin.
            os.chmod(rootfs, 0o755)
            cmd = [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                rootfs,
                _apt_mirror(),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if proc.returncode != 0:
                raise Unavailable(f"debootstrap failed: {proc.stdout[-1500:]}{proc.stderr[-500:]}")
            # Keep the base small: apt lists and caches are not needed in an image.
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in Path(rootfs, sub).glob("*"):
                    if p.is_file():
                        p.unlink()
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                imp = subprocess.run(
                    ["podman", "--runtime", "runc", "import", "-", BASE_IMAGE],
                    stdin=tar.stdout,
                    env=podman_env(),
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
            finally:
                if tar.stdout is not None:
                    tar.stdout.close()
                tar.wait()
            if imp.returncode != 0 or tar.returncode != 0:
                raise RuntimeError(f"podman import failed: {imp.stderr[-1500:]}")
    return BASE_IMAGE


def build_image(context: Path, tag: str, base: str) -> subprocess.CompletedProcess[str]:
    """Build the project's Dockerfile on ``base``; pip inside reaches PyPI via the host."""
    args = [
        "build",
        # One container per stage, committed once: with the vfs driver every layer is a full
        # copy, and this halves the build time (no layer cache, which a test build never reuses).
        "--layers=false",
        # Docker format keeps HEALTHCHECK (the OCI image format has no field for it).
        "--format",
        "docker",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        "--tag",
        tag,
        "--file",
        str(context / "Dockerfile"),
    ]
    if HOST_CA_BUNDLE.exists():
        # Debian's pip trusts the system bundle: mount the host's over it, so that a proxy's
        # CA that the host trusts for PyPI is trusted inside the build too.
        args += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    with _lock():  # builds and prunes of concurrent test runs must not interleave
        return podman([*args, str(context)], timeout=900)


def remove_image(tag: str) -> None:
    """Remove a test image and the dangling stage images its build left."""
    with _lock():
        podman(["rmi", "--force", tag], check=False)
        podman(["image", "prune", "--force"], check=False)


if __name__ == "__main__":
    print(ensure_base_image(), file=sys.stderr)
