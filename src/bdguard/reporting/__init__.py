"""Figures and reports drawn from runs; imported on demand, since matplotlib is slow to import."""
