"""Deprecated name of ``ray_jobs.select`` (stage 2); kept so existing job commands keep working."""

import sys

from ray_jobs._entry import run

if __name__ == "__main__":
    print("ray_jobs.score_select is deprecated; use: python -m ray_jobs.select", file=sys.stderr)
    run("select")
