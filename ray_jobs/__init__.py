"""Thin Ray entry points, one per stage: ``ray job submit ... -- python -m ray_jobs.<name> key=value ...``."""
