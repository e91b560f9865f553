"""ckptflow: train a Keras model under Prefect without ever losing work.

Layers, each importing only those below it: `core` (no Prefect), `tutorial`, `orchestration`
(Prefect glue), `stages` and `training`, and `flows` on top. Importing a module does no work.
"""
