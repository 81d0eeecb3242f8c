"""The k-fold stage: retrain the search's best configs on every fold, score out-of-fold, ensemble, submit.

plan.py (inputs, resume), tasks.py (Ray tasks), stage.py (orchestration), report.py (summary, MLflow, hand-off).
"""
