"""dask-memory-exporter: the Dask worker memory breakdown as Prometheus metrics."""

from .collector import package_version

__all__ = ["__version__"]
__version__ = package_version("dask-memory-exporter")
