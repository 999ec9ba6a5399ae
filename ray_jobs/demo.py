"""The embedded demo (local Ray, tiny models, generated data).

Local:    python -m ray_jobs.demo [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.demo key=value ...
Same arguments as `selectmoe demo`; `python -m ray_jobs.demo --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("demo")
