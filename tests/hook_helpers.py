"""Engine hook calls as the media node sends them, for the site's hook endpoints."""

from __future__ import annotations

import json
import time


def signed_hook(secret: str, payload: dict, timestamp: int | None = None) -> dict:
    """Body and headers of an engine hook call, signed as engine/hooks.py signs them (with a
    fresh nonce unless the payload has one)."""
    from watchbuy.engine.hooks import (
        NONCE_FIELD,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        new_nonce,
        sign,
    )

    payload = {NONCE_FIELD: new_nonce(), **payload}
    body = json.dumps(payload, separators=(",", ":")).encode()
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"content": body,
            "headers": {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp,
                        SIGNATURE_HEADER: sign(secret, stamp, body)}}
