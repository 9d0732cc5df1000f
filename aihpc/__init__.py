"""aihpc: a Snakemake workflow for training, compressing and evaluating models on HPC."""

import os

# Read once when torch's OpenMP runtime starts, so it must be set before torch is imported:
# idle OpenMP threads then sleep instead of spinning, which on a small machine otherwise
# starves the threads of concurrent jobs. An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
