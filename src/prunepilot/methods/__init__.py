"""Unstructured / N:M methods, one small file each; registry.py registers them with their options and pipeline."""
