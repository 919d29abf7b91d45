"""Process entry point of the gateway: `python -m gateway` (configured like every service by
environment variables: SPECD_HTTP_LISTEN, SPECD_ORCHESTRATOR, SPECD_MODEL_NAME, ...)."""

from __future__ import annotations

import logging
import os
import sys

from services.auth import OPEN_WARNING, ApiKeys
from services.config import ConfigError, GatewayConfig, split_host_port
from services.flags import GATEWAY, environment
from services.server import setup_logging

log = logging.getLogger("gateway")


def main() -> int:
    env = environment("python -m gateway", "The OpenAI-compatible HTTP gateway of specd.", GATEWAY, sys.argv[1:], os.environ)
    setup_logging(env.get("SPECD_LOG_LEVEL", "INFO"))
    try:
        config = GatewayConfig.from_env(env)
        keys = ApiKeys.from_env(env)
    except ConfigError as err:
        log.error("gateway: %s", err)
        return 2
    import uvicorn

    from gateway.app import create_app
    from services.metrics import serve_metrics

    try:
        if config.metrics_listen:
            serve_metrics(config.metrics_listen, "gateway")
    except OSError as err:
        log.error("gateway: cannot serve metrics on %s: %s", config.metrics_listen, err)
        return 2
    host, port = split_host_port(config.listen, "SPECD_HTTP_LISTEN")
    log.info("OpenAI-compatible API at http://%s/v1 for model %s, orchestrator %s", config.listen,
             config.model_name, config.orchestrator)  # fmt: skip
    # uvicorn stops on SIGTERM/SIGINT, letting running responses finish
    if keys.open:
        log.warning(OPEN_WARNING, config.listen)
    uvicorn.run(create_app(config, keys=keys), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
