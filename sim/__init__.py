"""A deterministic simulation of exojet's control plane (see docs/design-notes.md,
"Deterministic simulation"): the real projection, planner, retry timer and liveness
decisions, simulated runners driven by the lifecycle table, over a simulated
JetStream log, every choice made by one seeded random source.
"""
