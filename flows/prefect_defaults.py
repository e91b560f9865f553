"""Prefect settings ckptflow's entry points default to; import before Prefect, which reads them once.

An ad-hoc run starts Prefect's temporary server, which on a busy 2-core machine can take longer
than Prefect's 20 s default to come up; and nothing is sent to Prefect's analytics. A value the
user sets in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
