"""alignshield: keep a language model's safety alignment through user fine-tuning."""

import os
import sys

__version__ = "0.1.0"

OPENMP_SPINCOUNT = "1000"
"""How long an idle OpenMP thread spins before it sleeps. libgomp's default (300,000 spins) made
2-thread training steps 1.5-3x slower whenever another process used a core: the spinning thread
takes the core from the thread doing the work. 1,000 costs nothing on an idle machine
(benchmarks/throughput.py --contention measures both). Set only when the user has not set
GOMP_SPINCOUNT or OMP_WAIT_POLICY, and only before torch is loaded (OpenMP reads it once)."""

if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
