"""Boundary decision 1, placement: which hardware and precision runs which stage, how many of each.

Pure Python (no torch, except ``profile``, which measures the local engine):

* ``spec`` + ``catalog/``: accelerators, links, model shapes, each with sources and confidence;
* ``cost``: the cost model as pure functions that name what binds;
* ``simulator``: a deployment under simulated time, on the runtime's own scheduler, allocator and leases;
* ``scenario``, ``search``: the placements a fleet allows, simulated and ranked, with a Pareto frontier;
* ``explain``: the binding constraint and the coupling matrix, by relieving one or two axes at a time;
* ``report``, ``emit``, ``profile``, ``cli``: pictures, deployment files, calibration, ``hetpd plan``.
"""
