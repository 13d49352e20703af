"""Stage two: temporal heads trained on the feature cache.

model.py (the heads), train.py (train_one_epoch / evaluate / HeadRun / train_head), checkpoint.py (self-describing
checkpoints), metrics.py, infer.py (evaluate a checkpoint on a cache, predict on new videos), sweep.py (many heads
searched by Optuna on one cache), space.py (its search spaces), reduce.py (PCA of the features, folded into
checkpoints), stack.py (mean-pool heads of one shape trained as one model).
"""
