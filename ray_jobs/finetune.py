"""Stage 3, LoRA finetuning of the target on Ray Train.

Local:    python -m ray_jobs.finetune [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.finetune key=value ...
Same arguments as `selectmoe finetune`; `python -m ray_jobs.finetune --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("finetune")
