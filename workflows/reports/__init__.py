"""Figures for people: per-category ROC/PRO curves and anomaly-map galleries, logged to MLflow."""
