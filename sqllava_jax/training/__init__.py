"""Optimizer groups and schedules, the train step and loop, checkpoints."""
