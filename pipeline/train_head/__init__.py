"""Stage two: temporal heads trained on the feature cache.

model.py (the heads), train.py (train_one_epoch, evaluation, HeadRun, `train_head`), checkpoint.py (self-describing
checkpoints), metrics.py (reports, plots), evaluate.py (a checkpoint scored on any cache of the same features).
Calling the package runs `train.train_head`: `pipeline.train_head("cache.h5", "runs/lstm")`.
"""

from pipeline import _callable_stage

_callable_stage(__name__)
