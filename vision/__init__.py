"""Supervised vision: models and the classification task."""
