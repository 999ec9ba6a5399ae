"""Stage 4, lm-eval in Ray tasks.

Local:    python -m ray_jobs.evaluate [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.evaluate key=value ...
Same arguments as `selectmoe evaluate`; `python -m ray_jobs.evaluate --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("evaluate")
