"""Many heads searched on one cache with Optuna: run.py (the study, its ask/tell loop, the refit, the leaderboard),
space.py (search spaces), stack.py (mean-pool trials of one shape trained as one model), reduce.py (PCA of the
features, folded into checkpoints). Calling the package runs `run.sweep`: `pipeline.sweep("cache.h5", "runs/sw")`.
"""

from pipeline import _callable_stage

_callable_stage(__name__)
