"""Sweeps over lambda and channel counts, and the rate-distortion reports that judge them.

rd.py: RD math (curves, Bjontegaard deltas, Pareto fronts, plots), NumPy only.
space.py: the search space; sweep.py: the Tuner around compresszoo.train.fit with ASHA per
(architecture, lambda); report.py: RD curves, Pareto front, BD-rate, the tuned-zoo config.
"""
