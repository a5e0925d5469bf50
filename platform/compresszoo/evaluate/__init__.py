"""Rate-distortion evaluation: RD math (curves, Bjontegaard deltas, Pareto fronts, plots),
classic reference codecs, and the runner that codes a folder of images and writes the report."""
