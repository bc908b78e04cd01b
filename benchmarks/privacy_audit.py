"""Standard privacy sweep of the default model: what the server reads back, what the noise
costs, and the clean-prefix defense next to plain noise.

The baseline measured in the same run is the unsplit model's perplexity on the same
held-out text; every perplexity is also reported as a ratio to it.  Extra arguments go to
`fedsea audit` (e.g. `--defenses clean-prefix adapted-tail`, `--heads 2`).

    nice -n 19 python benchmarks/privacy_audit.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedsea.cli import main

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    main([
        "audit", "--json", str(RESULTS / "privacy_audit.json"), "--plot", str(RESULTS / "privacy_audit.png"),
        *sys.argv[1:],
    ])
