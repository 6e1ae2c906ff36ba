"""A NATS operator of its own for tests: the server configuration of decentralized (JWT)
authentication and a user's `.creds` file, the way `nsc` makes them, so tests can run
`nats.credentials` against a real nats-server without `nsc`.

A JWT here is `base64url(header).base64url(claims).base64url(signature)`, the signature an
ed25519 signature of the first two parts by the issuer's nkey: the operator signs the account,
the account signs the user. The account's limits enable JetStream.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nkeys
import orjson

if TYPE_CHECKING:
    from pathlib import Path

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = -1
_ACCOUNT_LIMITS = ["subs", "data", "payload", "imports", "exports", "conn", "leaf"]
_ACCOUNT_LIMITS += ["mem_storage", "disk_storage", "streams", "consumer"]  # JetStream, on for the account


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class Keys:
    seed: bytes

    @classmethod
    def new(cls, prefix: int) -> Keys:
        return cls(nkeys.encode_seed(os.urandom(32), prefix))

    @property
    def public(self) -> str:
        public: bytes = nkeys.from_seed(bytearray(self.seed)).public_key
        return public.decode()

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(bytearray(self.seed)).sign(data)
        return signature


def jwt(issuer: Keys, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(orjson.dumps(claims)).digest()).decode().rstrip("=")
    signed = f"{_b64(orjson.dumps(_HEADER))}.{_b64(orjson.dumps(claims))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


@dataclass(frozen=True)
class Operator:
    """One operator and one account with JetStream; `user_creds` writes users of that account."""

    operator: Keys
    account: Keys
    system: Keys
    """The system account, which nats-server needs to start JetStream in operator mode."""

    @classmethod
    def new(cls) -> Operator:
        kinds = (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT, nkeys.PREFIX_BYTE_ACCOUNT)
        return cls(*(Keys.new(kind) for kind in kinds))

    def server_config(self) -> str:
        """nats-server configuration trusting this operator, with the account preloaded."""
        operator = jwt(self.operator, self.operator.public, "test-operator", {"type": "operator"})
        limits = dict.fromkeys(_ACCOUNT_LIMITS, _UNLIMITED)
        account = jwt(
            self.operator, self.account.public, "jetspool", {"type": "account", "limits": limits | {"wildcards": True}}
        )
        system = jwt(self.operator, self.system.public, "SYS", {"type": "account"})
        return (
            f'operator: "{operator}"\nsystem_account: {self.system.public}\nresolver: MEMORY\n'
            f'resolver_preload: {{ {self.account.public}: "{account}", {self.system.public}: "{system}" }}\n'
        )

    def user_creds(self, path: Path, *, signer: Keys | None = None) -> Path:
        """A `.creds` file of a new user of the account; `signer`: sign it with another key instead."""
        user = Keys.new(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED}
        token = jwt(signer or self.account, user.public, "jetspool-user", claims)
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
        )
        return path
