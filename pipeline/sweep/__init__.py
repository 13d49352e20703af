"""Many heads searched on one cache with Optuna: run.py (the study: its space, data, creation or joining),
storage.py (where it lives, heartbeats, which trials count), trials.py (the ask/tell loop), refit.py (the best
settings on the full features), results.py (leaderboard, best.pt, importances, search.png), space.py (search spaces),
stack.py (mean-pool trials of one shape trained as one model), reduce.py (PCA of the features, folded into
checkpoints). Calling the package runs `run.sweep`: `pipeline.sweep("cache.h5", "runs/sw")`.
"""

from pipeline import _callable_stage

_callable_stage(__name__)
