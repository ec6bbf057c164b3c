# dask-gateway server configuration: let the exporter's user list every user's clusters.
#
# dask-gateway's listing (GET /api/v1/clusters/) returns only the clusters of the user the
# request authenticates as, admin or not. `dask-memory-exporter serve --gateway` exports what
# that listing returns, so without this its token sees only its own user's clusters (none).
# Append this file to the gateway's configuration (dask_gateway_config.py), or with the Helm
# chart:  helm upgrade ... --set-file gateway.extraConfig.memoryexporter=monitoring_user.py
#
# It wraps whichever backend is configured above it. Only the listing changes: the users named
# here get every user's running clusters, with their TLS credentials (which let a client do
# anything on those schedulers: guard this user's token like an administrator's). Every other
# request (get, scale, stop a cluster) still checks ownership as before.
# The chart pastes gateway.extraConfig after its own settings (backend_class KubeBackend);
# everything is inside one function so that the snippet defines no names in that file.


def _with_monitoring_users(config):
    from traitlets.utils.importstring import import_item

    users = {
        "dask-memory-exporter",  # SimpleAuthenticator / KerberosAuthenticator user name
        "service:dask-memory-exporter",  # JupyterHubAuthenticator: a JupyterHub service's name
    }
    base = config.DaskGateway.get(
        "backend_class", "dask_gateway_server.backends.local.UnsafeLocalBackend"
    )
    base = import_item(base) if isinstance(base, str) else base

    class MonitoredBackend(base):
        async def list_clusters(self, username=None, statuses=None):
            if username in users:
                username = None  # every user's clusters
            return await super().list_clusters(username=username, statuses=statuses)

    MonitoredBackend.__name__ = MonitoredBackend.__qualname__ = "Monitored" + base.__name__
    config.DaskGateway.backend_class = MonitoredBackend


_with_monitoring_users(c)  # noqa: F821  (c: the configuration being loaded)
