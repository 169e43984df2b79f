"""Evaluation: metrics and analysis of embedding sets."""
