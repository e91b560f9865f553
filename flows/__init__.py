"""ckptflow flows: they wire the stages in `tasks/` together and hold no ML logic."""
