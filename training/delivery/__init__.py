"""Delivering the selected ensemble: masks for image folders (predict.py), the ONNX export, the MLflow model."""
