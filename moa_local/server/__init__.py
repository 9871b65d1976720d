"""The OpenAI-compatible server: `openai.py` (the app, routes, error shape), `schemas.py` (wire format),
`gather.py` (request gathering into shared batches), `settings.py`, `background.py` (uvicorn runners).
FastAPI and uvicorn are imported only when an app is created (the `server` extra)."""

from moa_local.server.settings import ServerSettings

__all__ = ["ServerSettings"]
