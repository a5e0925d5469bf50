"""Sweeps over lambda and channel counts, and the rate-distortion reports that judge them.

space.py: the search space; scheduler.py: ASHA per (architecture, lambda); trial.py: one
trial (compresszoo.train.fit, then its measured RD point); sweep.py: the Tuner that runs them,
resume and the report's bookkeeping; report.py: RD curves, Pareto front, BD-rate, the
tuned-zoo config. scheduler, trial and sweep import Ray (and, through tracking, MLflow) at
the top: nothing outside sweep code imports them, so `import compresszoo` stays light.
"""
