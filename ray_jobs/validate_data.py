"""Check and normalise a corpus (rejects.jsonl, manifest).

Local:    python -m ray_jobs.validate_data [--config FILE] [key=value ...]
Cluster:  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
              --runtime-env cluster_configs/runtime_env.yaml -- python -m ray_jobs.validate_data key=value ...
Same arguments as `selectmoe validate-data`; `python -m ray_jobs.validate_data --help` lists the keys.
"""

from ray_jobs._entry import run

if __name__ == "__main__":
    run("validate-data")
