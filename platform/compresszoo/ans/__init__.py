"""The rANS entropy coder: a compiled kernel (`_rans`, built from Cython) behind `rans`, and
its slow pure-Python twin `rans_py`. A leaf: nothing here imports the rest of compresszoo."""
