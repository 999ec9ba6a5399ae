"""Ray Tune sweep over quality-loss types and weights.

Local:    python -m ray_jobs.sweep [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.sweep key=value ...
Same arguments as `selectmoe sweep`; `python -m ray_jobs.sweep --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("sweep")
