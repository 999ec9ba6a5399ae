"""Stage 1, router pretraining on Ray Train.

Local:    python -m ray_jobs.pretrain [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.pretrain key=value ...
Same arguments as `selectmoe pretrain`; `python -m ray_jobs.pretrain --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("pretrain")
