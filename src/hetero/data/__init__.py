"""Particle data: file readers, the particle table, datasets, samplers, synthetic data."""
