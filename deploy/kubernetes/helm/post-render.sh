#!/bin/sh
# Helm post-renderer: reads the rendered chart on stdin, prints it with the dask-memory-exporter
# sidecar and monitoring resources added (see kustomization.yaml beside this script).
#
#   helm install dask dask/dask --post-renderer ./deploy/kubernetes/helm/post-render.sh
#   helm template dask dask/dask | ./deploy/kubernetes/helm/post-render.sh    # to inspect
#
# DASK_MEMORY_EXPORTER_IMAGE=REGISTRY/dask-memory-exporter:TAG (or @sha256:...) in the
# environment sets the exporter's image; helm passes its environment to the post-renderer.
# Needs `kustomize` or `kubectl` (with its built-in kustomize) on PATH.
set -eu
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
# Kustomize accepts no absolute component paths and no files from outside a kustomization's
# directory (nor a component that contains the kustomization), so the chart output goes into a
# scratch directory beside this one.
work=$(mktemp -d "$here/../.helm-render.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM
cat >"$work/helm-output.yaml"
cat >"$work/kustomization.yaml" <<'KUSTOMIZATION'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - helm-output.yaml
components:
  - ../helm
KUSTOMIZATION
image=${DASK_MEMORY_EXPORTER_IMAGE:-}
if [ -n "$image" ]; then
    # REGISTRY[:PORT]/NAME[:TAG] or REGISTRY[:PORT]/NAME@DIGEST
    name=$image tag='' digest=''
    case "$image" in
        *@*) name=${image%%@*} digest=${image#*@} ;;
        *) case "${image##*/}" in *:*) name=${image%:*} tag=${image##*:} ;; esac ;;
    esac
    {
        echo "images:"
        echo "  - name: dask-memory-exporter"
        echo "    newName: $name"
        [ -z "$tag" ] || echo "    newTag: \"$tag\""
        [ -z "$digest" ] || echo "    digest: $digest"
    } >>"$work/kustomization.yaml"
fi
if command -v kustomize >/dev/null 2>&1; then
    kustomize build "$work"
else
    kubectl kustomize "$work"
fi
