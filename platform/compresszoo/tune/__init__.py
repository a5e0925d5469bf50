"""Sweeps over lambda and channel counts, and the rate-distortion reports that judge them.

space.py: the search space; sweep.py: the Tuner around compresszoo.train.fit with ASHA per
(architecture, lambda); report.py: RD curves, Pareto front, BD-rate, the tuned-zoo config.
"""
