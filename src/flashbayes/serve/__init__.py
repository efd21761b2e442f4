"""Real-time posterior service: many streams of observations, each filtered by an amortized
model, micro-batched into one compiled call, with every acknowledged update kept in SQLite.

Start it with `flashbayes serve CHECKPOINT`; docs/service.md describes the API, its bounds and
its guarantees. `create_app` builds the FastAPI application for use in other ASGI servers.
"""

from flashbayes.serve._app import ServeConfig, check_bind, create_app, is_loopback
from flashbayes.serve._store import StoreError

__all__ = ["ServeConfig", "StoreError", "check_bind", "create_app", "is_loopback"]
