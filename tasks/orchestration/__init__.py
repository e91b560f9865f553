"""Prefect glue shared by the stages: retry conditions, cache keys, artifacts, log routing."""
