"""One TLS context for every HTTP client a run builds."""

from __future__ import annotations

import ssl
from functools import cache

import httpx


@cache
def tls_context() -> ssl.SSLContext:
    """httpx's default context (certifi's CA bundle), built once per process.

    Building it reads and parses the whole CA bundle: tens of milliseconds of CPU for every
    client, plain-http ones included, where a run builds a client per registry check and per
    GitHub session. The context is not changed after it is built, so sharing it is safe.
    """
    return httpx.create_ssl_context()


@cache
def _prefect_context(insecure: bool, cert_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if insecure else cert_file)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def prefect_tls_context() -> ssl.SSLContext:
    """The context Prefect's client would build from its settings (an insecure one, or
    ``PREFECT_API_SSL_CERT_FILE``, else certifi's bundle), built once per distinct setting:
    for clients the lock protocol opens per call."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    return _prefect_context(insecure, PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
