"""Evaluate reward methods on preference data {id, prompt, chosen, rejected[, subset]}.

Local (starts a local Ray):
    python jobs/evaluate.py --config configs/evaluate.yaml input.path=pairs.jsonl output.path=outputs/eval
On a cluster:
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml \
        input.path=s3://bucket/pairs/ output.path=s3://bucket/eval/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
