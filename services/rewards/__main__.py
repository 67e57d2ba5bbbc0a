"""`python -m services.rewards`: run the rewards service alone (zero config: embedded PostgreSQL)."""

from __future__ import annotations

import sys

from libs.server import run
from services.rewards.bootstrap import build_spec


def main() -> int:
    return run(build_spec())


if __name__ == "__main__":
    sys.exit(main())
