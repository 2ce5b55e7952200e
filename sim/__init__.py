"""A deterministic simulation of exojet's control plane (see docs/design-notes.md,
"Deterministic simulation"): the real projection, planner, retry timer and liveness
decisions, the real runner's decisions (`runner/handling.py`) with simulated work,
over a simulated JetStream log, every choice made by one seeded random source.
"""
