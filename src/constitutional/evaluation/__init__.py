"""Evaluation: metrics and plots for stage 6 (``cai evaluate``): behaviour detectors, Elo and plots."""
