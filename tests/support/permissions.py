"""NATS users the tests restrict, to make one kind of JetStream request fail on purpose."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


PASSWORD = "pw"


def users(user: str, denied: Iterable[str]) -> str:
    """A nats-server `authorization` block: `user` may not publish to the `denied` subjects (a
    request to one gets no answer and times out; a message to one is dropped), `admin` may do
    anything. Both have the password `PASSWORD`."""
    deny = ", ".join(f'"{subject}"' for subject in denied)
    return (
        "authorization { users: [\n"
        f'  {{user: "{user}", password: "{PASSWORD}", permissions: {{publish: {{deny: [{deny}]}}}}}}\n'
        f'  {{user: "admin", password: "{PASSWORD}"}}\n'
        "]}\n"
    )


def as_user(user: str) -> dict[str, dict[str, str]]:
    """Settings overrides that connect as `user`."""
    return {"nats": {"user": user, "password": PASSWORD}}
