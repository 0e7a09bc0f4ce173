"""Build DPO preference pairs (TRL format) from a scored output.

    python jobs/pairs.py --config configs/pairs.yaml
    ray job submit --working-dir . -- python jobs/pairs.py --config configs/pairs.yaml \
        input.path=s3://bucket/scored/ output.path=s3://bucket/pairs/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
