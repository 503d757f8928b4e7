"""Shared fixtures for the official-SDK conformance tests.

The tests drive a running Tether server through the unmodified official SDKs
(`qca-sdk` for the Qoder dialect under /api/v1/cloud, `anthropic` for the
Claude Managed Agents dialect under /v1).

    TETHER_URL=http://127.0.0.1:4780 TETHER_ADMIN_TOKEN=tth_adm_... \
        tests/sdk/.venv/bin/pytest tests/sdk -q

Every test creates its own environment, so queue statistics are exact.
Without TETHER_URL / TETHER_ADMIN_TOKEN the whole directory is skipped.
Environment keys are minted through the Tether extension
`POST /environments/{id}/keys` (SPEC §11.1); set TETHER_NO_ENV_KEYS=1 to fall
back to the admin token while that endpoint does not exist yet.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from datetime import datetime
from typing import Any, Callable, Optional, TypeVar

import httpx
import pytest

T = TypeVar("T")

# The SDKs read these from the environment; make sure nothing ambient leaks in
# (e.g. a real ANTHROPIC_API_KEY would override the bearer of scoped clients).
for _var in (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_PROFILE",
    "QODER_ACCESS_TOKEN",
    "QODER_PAT",
    "QODER_MANAGED_BASE_URL",
):
    os.environ.pop(_var, None)

TETHER_URL = os.environ.get("TETHER_URL", "").rstrip("/")
ADMIN_TOKEN = os.environ.get("TETHER_ADMIN_TOKEN", "")
QODER_PREFIX = "/api/v1/cloud"
ANTHROPIC_PREFIX = "/v1"

# Per-request HTTP timeout handed to every SDK client: comfortably above a
# 999 ms long poll, far below the SDKs' 600 s default.
HTTP_TIMEOUT = 15.0


def pytest_collection_modifyitems(config, items):
    if TETHER_URL and ADMIN_TOKEN:
        return
    skip = pytest.mark.skip(reason="set TETHER_URL and TETHER_ADMIN_TOKEN to run the SDK conformance tests")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def decode_secret(secret: str) -> dict:
    """`secret` is URL-safe base64 (padding optional) of a JSON object (SPEC §11.1)."""
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    payload = json.loads(raw)
    assert isinstance(payload, dict), payload
    return payload


def parse_ts(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    assert isinstance(value, str) and value.endswith("Z"), f"not an RFC 3339 UTC timestamp: {value!r}"
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def wait_until(fn: Callable[[], Optional[T]], *, timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    """Call `fn` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Optional[T] = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def _find_token(obj: Any, prefix: str) -> Optional[str]:
    # a whole secret: prefix + 43 base64url chars (SPEC §11.1) — not a display hint like "tth_env_AU02…"
    if isinstance(obj, str) and re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_-]{43}", obj):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():
            found = _find_token(v, prefix)
            if found:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = _find_token(v, prefix)
            if found:
                return found
    return None


def mint_environment_key(environment_id: str, *, dialect_prefix: str = ANTHROPIC_PREFIX) -> str:
    """Mint a per-environment key with the admin token (Tether extension, SPEC §11.1).

    Not part of either SDK, so plain HTTP. The response shape is Tether's; we
    take the first value shaped like a whole environment-key secret.
    """
    if os.environ.get("TETHER_NO_ENV_KEYS") == "1":
        return ADMIN_TOKEN
    r = httpx.post(
        f"{TETHER_URL}{dialect_prefix}/environments/{environment_id}/keys",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        json={"name": "sdk-tests"},
        timeout=HTTP_TIMEOUT,
    )
    assert r.status_code == 200, f"minting an environment key failed: {r.status_code} {r.text}"
    key = _find_token(r.json(), "tth_env_")
    assert key, f"no tth_env_… secret in the key-creation response: {r.text}"
    return key


def raw_get(path: str, *, token: str = "", dialect_prefix: str = QODER_PREFIX) -> httpx.Response:
    """Plain GET for the few Tether-only reads the SDKs do not model."""
    return httpx.get(
        f"{TETHER_URL}{dialect_prefix}{path}",
        headers={"Authorization": f"Bearer {token or ADMIN_TOKEN}"},
        timeout=HTTP_TIMEOUT,
    )


CUSTOM_TOOL = {
    "type": "custom",
    "name": "add",
    "description": "Add two integers and return the sum as text.",
    "input_schema": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
}
MODEL = "claude-sonnet-4-6"
