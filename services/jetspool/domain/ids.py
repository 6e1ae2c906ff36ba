"""Request ids that name their queue message.

A request submitted without an `Idempotency-Key` gets an id derived from where its message
landed: a UUID (version 8, RFC 9562) whose first 48 bits are the message's stream sequence and
whose other 74 free bits are a random nonce the message carries. The gateway then stores one
thing per submit, the message; until a worker takes the request there is no status record, and
a status read finds the waiting request by the sequence in its id (`StatusStore.get`), checking
the nonce, so an id can only ever name its own message.

An id chosen before the message is stored (a keyed submit claims its key with it) is a random
UUID4, and its status record is written at submit, as every request's once was.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Final

_VERSION: Final = 8
_VARIANT: Final = 0b10
_NONCE_BITS: Final = 74
_LOW_BITS: Final = 62
_SEQ_BITS: Final = 48
MAX_SEQ: Final = (1 << _SEQ_BITS) - 1


def new_nonce() -> str:
    """The random part of a derived id, as the message carries it (hex)."""
    return f"{secrets.randbits(_NONCE_BITS):019x}"


def derived_id(seq: int, nonce: str) -> str:
    """The id of the request stored at stream sequence `seq` with `nonce`."""
    if not 0 < seq <= MAX_SEQ:
        raise ValueError(f"stream sequence {seq} does not fit a request id")
    bits = int(nonce, 16)
    value = (
        (seq << 80)
        | (_VERSION << 76)
        | ((bits >> _LOW_BITS) << 64)
        | (_VARIANT << _LOW_BITS)
        | (bits & ((1 << _LOW_BITS) - 1))
    )
    return str(uuid.UUID(int=value))


def parse_derived(request_id: str) -> tuple[int, str] | None:
    """(stream sequence, nonce) of a derived id in canonical form; None for any other id."""
    value = uuid.UUID(request_id).int
    if (value >> 76) & 0xF != _VERSION or (value >> _LOW_BITS) & 0b11 != _VARIANT:
        return None
    seq = value >> 80
    if seq == 0:
        return None
    bits = (((value >> 64) & 0xFFF) << _LOW_BITS) | (value & ((1 << _LOW_BITS) - 1))
    return seq, f"{bits:019x}"
