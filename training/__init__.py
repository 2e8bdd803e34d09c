"""toothseg learning side: retraining jobs, datasets, model changes, metrics, synthetic data, CLI."""
