"""Sweeps over lambda and channel counts, and the rate-distortion reports that judge them.

rd.py holds the RD math (curves, Bjontegaard deltas, Pareto fronts, plots); it needs only NumPy.
"""
