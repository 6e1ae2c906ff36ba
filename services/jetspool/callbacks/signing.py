"""Standard Webhooks signatures (https://www.standardwebhooks.com) on callbacks, when a secret is set.

`webhook-id` names the message and stays the same across attempts and redeliveries of one run's
outcome; `webhook-timestamp` is the attempt's Unix time; `webhook-signature` is
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`. Text bodies are signed with the
`standardwebhooks` package itself; a body that is not UTF-8 (a function's raw binary output)
gets the same HMAC over its bytes, which that package cannot take.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Final

from standardwebhooks.webhooks import Webhook

if TYPE_CHECKING:
    from datetime import datetime

WEBHOOK_ID: Final = "webhook-id"
WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
WEBHOOK_SIGNATURE: Final = "webhook-signature"
_PREFIX: Final = "whsec_"


class Signer:
    def __init__(self, secret: str | None) -> None:
        self._webhook = None if secret is None else Webhook(secret)
        self._key = None if secret is None else base64.b64decode(secret.removeprefix(_PREFIX) + "==")

    def headers(self, webhook_id: str, body: bytes, at: datetime) -> dict[str, str]:
        """The signature headers of one attempt; none when no secret is configured."""
        if self._webhook is None or self._key is None:
            return {}
        try:
            signature = self._webhook.sign(webhook_id, at, body.decode("utf-8"))
        except UnicodeDecodeError:
            signed = f"{webhook_id}.{int(at.timestamp())}.".encode() + body
            signature = "v1," + base64.b64encode(hmac.new(self._key, signed, hashlib.sha256).digest()).decode()
        return {
            WEBHOOK_ID: webhook_id,
            WEBHOOK_TIMESTAMP: str(int(at.timestamp())),
            WEBHOOK_SIGNATURE: signature,
        }
