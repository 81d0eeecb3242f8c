"""The k-fold stage: retrain the search's best configs on every fold, score out-of-fold, ensemble, submit.

plan.py (inputs, resume), tasks.py (Ray tasks), stage.py (orchestration), report.py (summary, MLflow, hand-off).
A later stage that retrains on the folds (the pseudo-label rounds) uses only what is exported here.
"""

from training.stages.kfold.plan import KFoldOptions, Retrain, RetrainConfig
from training.stages.kfold.stage import OUTBOX, run_kfold

__all__ = ["OUTBOX", "KFoldOptions", "Retrain", "RetrainConfig", "run_kfold"]
