"""`python -m ckptflow ...`: the same as the `ckptflow` command."""

from ckptflow.flows.cli import entry_point

entry_point()
