"""What every stage shares below its own plan: files, Ray, MLflow lineage, locks, progress, compatibility shims."""
