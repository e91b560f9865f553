"""The core: files, lock, manifest, checkpoints, export formats, the run directory; no Prefect."""
