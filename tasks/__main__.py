"""`python -m ckptflow ...`: the same as the `ckptflow` command."""

import sys

from ckptflow.flows.cli import main

sys.exit(main())
