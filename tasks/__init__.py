"""ckptflow: train a Keras model under Prefect without ever losing work.

Layers, each importing only those below it: `ckptflow.core` (files, lock, manifest, checkpoints,
formats, the run directory; no Prefect, no stage), `ckptflow.tutorial` (the tutorial's own model
and data), `ckptflow.orchestration` (Prefect's retries, cache keys and artifacts),
`ckptflow.stages` and `ckptflow.training` (a plain function and a thin task each), and on top
`ckptflow.flows` (the flows and the `ckptflow` command). Importing a module does no work.
"""
