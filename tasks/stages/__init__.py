"""The pipeline's stages: each module holds a plain stage function and its thin Prefect task."""
