"""Datasets, continual-learning scenarios and client partitions."""
