"""`python -m services.gateway`: the HTTP/JSON gateway in front of the four services.

Listens on LOYALTY_HOST:LOYALTY_PORT (default 127.0.0.1:8080) and forwards to the services at
LOYALTY_{PROFILE,SCORING,REWARDS,RISK}_ADDR. Zero config: the services on their default ports.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from libs.contracts import ContractError
from libs.logs import configure_logging
from libs.settings import get_settings
from libs.telemetry import configure_tracing
from services.gateway.app import create_app

log = logging.getLogger("services.gateway")


def main() -> int:
    settings = get_settings()
    configure_logging("gateway", settings.log_level, settings.log_json)
    configure_tracing("gateway", settings)
    try:
        app = create_app(settings)
    except ContractError as error:
        log.error("the contracts cannot be served over HTTP", extra={"error": str(error)})
        return 1
    port = settings.port_for("gateway")
    log.info("gateway listening", extra={"address": f"http://{settings.host}:{port}", "docs": "/docs"})
    # log_config=None keeps our JSON logging; the gateway logs one line per request itself.
    uvicorn.run(app, host=settings.host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(settings.grace_period_s), lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
