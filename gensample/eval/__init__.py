"""Evaluation: image output, oracle metrics, FID."""
