"""Synthetic training data: DRRs from a CT with simulated fractures, and 2-D procedural phantoms."""
