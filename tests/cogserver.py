"""Cog's real server for the tests: bench/cogserver.py, which the serving benchmark drives too."""

from bench.cogserver import (
    BUSY_RETRY_S,
    ROOT,
    TERMINAL,
    CogServer,
    WebhookReceiver,
    cog_schema_module,
    max_concurrency,
    script_module,
)

__all__ = [
    "BUSY_RETRY_S",
    "ROOT",
    "TERMINAL",
    "CogServer",
    "WebhookReceiver",
    "cog_schema_module",
    "max_concurrency",
    "script_module",
]
