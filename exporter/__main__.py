"""``python -m dask_memory_exporter``: same as the ``dask-memory-exporter`` command."""

from .cli import main

raise SystemExit(main())
