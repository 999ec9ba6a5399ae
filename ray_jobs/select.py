"""Stage 2, scoring on Ray Data and exact selection.

Local:    python -m ray_jobs.select [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.select key=value ...
Same arguments as `selectmoe select`; `python -m ray_jobs.select --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("select")
