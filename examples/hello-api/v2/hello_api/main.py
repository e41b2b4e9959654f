"""The routes: /healthz, /docs (FastAPI's own) and a page saying which version runs."""

import html
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from . import db

VERSION = "v2"

PAGE = """<!doctype html>
<html><head><title>hello-api</title></head>
<body>
<h1>hello-api</h1>
<p>version <b id="version">{version}</b>, running <code id="sha">{sha}</code></p>
<p>visits: <b id="visits">{visits}</b></p>
</body></html>
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine = db.create_engine()  # no DATABASE_URL: KeyError, the app crashes on start
    app.state.head = db.head_revision()
    yield
    await app.state.engine.dispose()


app = FastAPI(title="hello-api", version=VERSION, lifespan=lifespan)


def running_sha() -> str:
    return os.environ.get("GIT_SHA") or os.environ.get("APP_VERSION") or "unknown"


@app.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    reason = await db.problem(request.app.state.engine, request.app.state.head)
    if reason is not None:
        return JSONResponse({"status": "unavailable", "database": reason}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})


@app.get("/", response_class=HTMLResponse)
async def index(request: Request) -> str:
    visits = await db.record_visit(request.app.state.engine)
    return PAGE.format(version=VERSION, sha=html.escape(running_sha()), visits=visits)
