"""The CompressAI release whose API the compat surface follows (not compresszoo's version)."""

__version__ = "1.2.8"
