"""Rate-distortion evaluation of learned models against classic codecs, all coded for real.

Modules, one job each: images (reading a folder of pictures), classic (JPEG/WebP/AVIF/JXL
reference codecs), learned (loading zoo models from checkpoints or the registry), coding
(coding pictures and measuring them into RD points), compare (curves, Bjontegaard rows,
published references), report (JSON/CSV/markdown, plots, MLflow), runner (the steps in
order), rd (RD math). pipelines/evaluate.py is the command line around runner.evaluate.
"""


class UsageError(ValueError):
    """Bad input to an evaluation (folder, model reference, codec list, reference file,
    tracking settings); the message names the input and the fix in one line."""


class EvaluationError(RuntimeError):
    """The evaluation could not finish for a reason outside its input (e.g. MLflow failed)."""
