"""Keep scored rows by threshold, quantile, top-k or best-of-N.

    python jobs/filter.py --config configs/filter.yaml
    ray job submit --working-dir . -- python jobs/filter.py --config configs/filter.yaml \
        input.path=s3://bucket/scored/ output.path=s3://bucket/filter/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
