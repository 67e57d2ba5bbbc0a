"""Container health check: exit 0 only when the server at HOST:PORT reports SERVING."""

from __future__ import annotations

import sys

from libs.clients import channel_credentials
from libs.settings import get_settings
from tools.supervisor import health_status


def main(argv: list[str]) -> int:
    address = argv[0] if argv else "127.0.0.1:50051"
    status = health_status(address, timeout_s=2.0, credentials=channel_credentials(get_settings()))
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
