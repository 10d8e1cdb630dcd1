"""Prefect flows of Stage 1. Importing this package sets offline and no-telemetry defaults before
prefect or transformers load (a user's explicit settings win)."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0",
               "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               # a temporary server on a busy 2-core machine can take longer than the default 20 s
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_k, _v)
