"""Score a corpus with FLIP rewards.

Local (starts a local Ray):
    python jobs/score.py --config configs/local.yaml
    python jobs/score.py input.path=data.jsonl output.path=out/   # embedded model on CPU
On a cluster:
    ray job submit --working-dir . -- python jobs/score.py --config configs/gpu.yaml \
        input.path=s3://bucket/corpus/ output.path=s3://bucket/scored/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
