"""Stages 1-4 in one run folder.

Local:    python -m ray_jobs.pipeline [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.pipeline key=value ...
Same arguments as `selectmoe pipeline`; `python -m ray_jobs.pipeline --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("pipeline")
