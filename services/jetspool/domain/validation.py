"""Readable messages for msgspec validation errors: `nats.replicas: Expected `int`, got `str``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import msgspec

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")
_NAMED = re.compile(r"(?P<key>[a-z][a-z0-9_]*(?:\[\d+\])?(?:\.[^\s:]+)?): (?P<rest>.*)", re.DOTALL)
"""A message of a section's own check that starts with the key it is about (`sync_interval: ...`):
said as `nats: sync_interval ...`, the key was not in the dotted form of every other message
(found by an audit)."""


def describe(exc: msgspec.ValidationError) -> str:
    """Turn msgspec's "... - at `$.nats.replicas`" into "nats.replicas: ..."."""
    match = _AT.match(str(exc))
    if match is None:  # pragma: no cover - the pattern matches every string
        return str(exc)
    path = re.sub(r"\.?\[(\d+)\]", r"[\1]", (match.group("path") or "").lstrip("."))
    what = match.group("what")
    unknown = _UNKNOWN.match(what)
    if unknown:
        return f"{path + '.' if path else ''}{unknown.group('key')}: unknown key"
    named = _NAMED.match(what)
    if named and path:  # a check of a whole section that names its key: `nats.sync_interval: ...`
        return f"{path}.{named.group('key')}: {named.group('rest')}"
    return f"{path}: {what}" if path else what
