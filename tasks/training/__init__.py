"""train-with-checkpoints: the stage, one loop per strategy, and the run setup they share."""
