"""Where the benchmarks read the shared evaluation data: `$FLIP_RAY_DATA` if set, else `shared/data`
next to the repository (`../shared/data` from its root)."""

import os
from pathlib import Path

DATA = Path(os.environ.get("FLIP_RAY_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
