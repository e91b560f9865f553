"""The core: files, lock, manifest, checkpoints, export formats, the run directory.

It imports neither Prefect nor any stage, so it can be used (and tested) on its own.
"""
