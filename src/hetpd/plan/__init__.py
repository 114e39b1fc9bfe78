"""Boundary decision 1, placement: which hardware and precision runs which stage, how many of each.

Pure Python (no torch): specs and the built-in catalog (``spec``), the cost model as pure
functions (``cost``). The simulator and the search come next.
"""
