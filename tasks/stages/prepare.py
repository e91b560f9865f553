"""Prepare a run without Prefect: fetch-data then build-model, as the flow's first stages do."""

from __future__ import annotations

from ckptflow.config import TrainConfig
from ckptflow.core.snapshot import DataRecord
from ckptflow.stages.build_model import build_model_stage
from ckptflow.stages.fetch_data import fetch_data


def prepare_run(config: TrainConfig) -> DataRecord:
    """Snapshot the data, save the untrained model into `config.run_dir`; return the data record."""
    data = fetch_data(config.run_dir, config.data, config.train_samples, config.test_samples,
                      config.seed, config.data_params)
    build_model_stage(config.run_dir, config.identity(), data)
    return data
