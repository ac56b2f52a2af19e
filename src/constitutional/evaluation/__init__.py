"""Evaluation: metrics and plots for stage 6.

``detectors.py`` holds the rule-based checks the effect table is built from: whether a
response refuses, redirects or answers (``classify_response``), and whether it is degenerate
(empty or a repetition loop: ``degenerate_reason``), with the hand-labelled examples that
measure how far to trust them (``load_refusal_examples``).
"""
