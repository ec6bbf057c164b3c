"""``python -m exporter``: same as the ``dask-memory-exporter`` command."""

from .cli import main

raise SystemExit(main())
