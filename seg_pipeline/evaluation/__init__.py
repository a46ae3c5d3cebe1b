"""Evaluation: metrics, reports and plots for segmentation predictions."""
