"""ckptflow's flows and its command line: they wire the stages together and hold no ML logic."""
