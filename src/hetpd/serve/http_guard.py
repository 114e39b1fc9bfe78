"""HTTP limits in front of the API: how the uvicorn server is configured for ``hetpd serve``."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from hetpd.serve.deploy import RouterConfig


def server_config(app: FastAPI, router: RouterConfig, port: int) -> uvicorn.Config:
    """The uvicorn configuration ``hetpd serve`` runs ``app`` with on ``router.host:port``."""
    return uvicorn.Config(app, host=router.host, port=port, log_level="warning")
