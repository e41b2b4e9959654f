"""Helpers the tests share (no fixtures: those live in ``tests/conftest.py``).

The canaries are secrets planted in the test account: no log, comment, artifact, user data or
exception may ever contain one.
"""

from __future__ import annotations

REGION = "ap-northeast-1"
CANARY_GHCR_TOKEN = "ghp_CANARYghcrToken1234567890abcdefABCD"
CANARY_DB_PASSWORD = "Canary%2FDbPassw0rd"
CANARY_DATABASE_URL = f"postgresql+asyncpg://app:{CANARY_DB_PASSWORD}@172.31.39.125:5432/app"
CANARIES = (CANARY_GHCR_TOKEN, CANARY_DB_PASSWORD, "Canary/DbPassw0rd")
