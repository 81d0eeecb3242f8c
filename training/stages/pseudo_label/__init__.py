"""The pseudo-label stage: label the test (and unlabelled) images with the k-fold's ensemble, add them to the
training side of every fold, retrain, score OOF on the real labels, repeat while OOF mIoU improves.

plan.py (inputs, checks, resume), tasks.py (the labelling Ray task), stage.py (rounds), report.py (summary, MLflow).
Each round's retraining is the k-fold stage itself (its public API: training/stages/kfold/__init__.py).
"""
