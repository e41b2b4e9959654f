"""One TLS context per process, with the verification Prefect's settings ask for."""

from __future__ import annotations

import ssl

from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

from tasks.run.tls import prefect_tls_context, tls_context
from tasks.steps.check_image import Registry


def test_every_client_shares_one_verifying_context() -> None:
    first, second = Registry("ghcr.io/octo-org/app"), Registry("ghcr.io/octo-org/other")
    contexts = {
        id(registry._client._transport._pool._ssl_context)  # type: ignore[attr-defined]
        for registry in (first, second)
    }
    assert contexts == {id(tls_context())}
    assert tls_context().verify_mode == ssl.CERT_REQUIRED and tls_context().check_hostname


def test_the_lock_calls_verify_as_prefect_is_configured() -> None:
    verifying = prefect_tls_context()
    assert verifying.verify_mode == ssl.CERT_REQUIRED and verifying is prefect_tls_context()
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = prefect_tls_context()
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    assert prefect_tls_context() is verifying
