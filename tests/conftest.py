"""Both tiers: tests/unit (Ray-free, `make test-fast`) and tests/integration (a real local
Ray, real training runs, real HTTP). This file only sets the environment every test needs."""

import os

# Set before torch or Ray start threads: spinning OpenMP threads on 2 shared cores cost 10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
