"""Answers of a function that an HTTP client reads with care: headers beyond its parser's defaults,
a content type that is not ASCII, a status no answer can carry, a content coding (found by a review).

Each test runs a real nats-server, the uvicorn gateway, the worker and a real HTTP function: the
recording uvicorn app where it can send the answer, a raw asyncio server where uvicorn cannot
(a byte that is not UTF-8 in a header, a status uvicorn refuses to send)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.raw_functions import raw_function
from tests.support.servers import Reply

if TYPE_CHECKING:
    from tests.support.stack import Stack


def _content_types(headers: Any) -> list[bytes]:
    return [value for name, value in headers.raw if name.lower() == b"content-type"]


@pytest.mark.parametrize(
    "content_type",
    [b"text/plain; charset=caf\xe9", "text/plain; x=caf\u00e9".encode(), "text/plain; x=\u20ac".encode()],
    ids=["latin-1-byte", "utf8-e-acute", "utf8-euro"],
)
async def test_a_non_ascii_content_type_completes_the_call_once_and_comes_back_exactly(
    stack: Stack, content_type: bytes
) -> None:
    """aiohttp decodes header values as UTF-8 with surrogateescape; invoke.py keeps that str as the
    result's content type. A byte that is not UTF-8 makes the completion write raise (msgspec cannot
    encode a lone surrogate): the 200 is thrown away, the function is called again at every attempt,
    and the request ends `runner_unavailable`. A UTF-8 one is handed out re-encoded as Latin-1
    (`é`) or not at all (`€`: the result route answers 500)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: 2\r\n\r\nok"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        final = await stack.wait_for_status("raw", request_id)
        result = await stack.client.get(f"/queue/raw/requests/{request_id}")

    assert (final["attempts"], final.get("error_type"), len(heads)) == (1, None, 1), final
    assert (result.status_code, result.content) == (200, b"ok")
    assert _content_types(result.headers) == [content_type], "SPEC §5 / README: the function's type, kept exactly"


@pytest.mark.parametrize(
    "headers",
    [
        tuple((f"x-h{i}", "v") for i in range(200)),  # 200 small headers, about 2 KiB in all
        (("x-big", "a" * 9000),),  # one header of 9,000 bytes
    ],
    ids=["200-small-headers", "one-9000-byte-header"],
)
async def test_a_200_with_many_or_long_headers_runs_once_and_keeps_what_fits(
    stack: Stack, headers: tuple[tuple[str, str], ...]
) -> None:
    """README ("The function's own headers"): kept in the order sent up to 16 KiB, the rest left out
    with a warning. aiohttp's parser refuses an answer with more than 128 header fields or a line
    over 8,190 bytes (ClientResponseError), which `_call` classifies as "cannot reach function": the
    function, which answered 200, is called `max_attempts` times and the request ends
    runner_unavailable."""
    await stack.register("echo", max_attempts=3)
    stack.functions.default = Reply(200, b"ok", "text/plain", headers=headers)
    request_id = await stack.submit("echo", content=b"x")

    final = await stack.wait_for_status("echo", request_id)

    assert (final["attempts"], final.get("error_type")) == (1, None), final.get("error")
    assert len(stack.functions.on("/echo")) == 1


@pytest.mark.parametrize("status_line", [b"101 Switching Protocols", b"600 Odd", b"099 Odd"])
async def test_a_status_no_final_answer_can_carry_does_not_break_the_result_route(
    stack: Stack, status_line: bytes
) -> None:
    """aiohttp hands back a 101 (and any three digits, 099 or 600-999) as the answer; the worker
    records it as the `function_error` outcome and the result route relays the code as is: uvicorn
    drops the connection for 600 (KeyError in its status-line table), Litestar answers 500 for 099,
    and a 101 answer switches the client's connection away from HTTP. RFC 9110 §15: a response
    with an invalid status is to be processed as a 5xx."""
    answer = b"HTTP/1.1 " + status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        final = await stack.wait_for_status("raw", request_id)
        result = await stack.client.get(f"/queue/raw/requests/{request_id}")  # 101 / 600: raises here

    assert len(heads) == final["attempts"]
    assert final["error_type"] == "function_error"
    assert 200 <= result.status_code <= 599
    assert result.status_code != 500, result.text
    assert result.headers["x-error-type"] == "function_error"


async def test_an_answer_that_cannot_be_read_is_a_bad_gateway_not_a_function_out_of_reach(stack: Stack) -> None:
    """aiohttp without Brotli cannot decode a `br` answer (the worker sends no Accept-Encoding, which
    says any coding will do: RFC 9110 §12.5.3). Taken for a function out of reach, the 200 was
    thrown away and the function called `max_attempts` times. The answer came: it stands as a 502
    (as a gateway takes an answer it cannot read), after one call."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nabcd"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        final = await stack.wait_for_status("raw", request_id)
        result = await stack.client.get(f"/queue/raw/requests/{request_id}")

    assert (final["attempts"], final["error_type"], len(heads)) == (1, "function_error", 1)
    assert "cannot be read" in final["error"]
    assert result.status_code == 502
    assert result.headers["x-error-type"] == "function_error"


async def test_a_body_left_in_its_coding_keeps_its_content_encoding(stack: Stack) -> None:
    """`functions.NOT_HANDED_ON` drops Content-Encoding because "the body comes decoded"; aiohttp
    decodes only gzip/deflate (br/zstd with extra packages) and passes any other coding through as
    received. The result is then encoded bytes with nothing saying so."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: compress\r\nContent-Length: 4\r\n\r\nabcd"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        await stack.wait_for_status("raw", request_id)
        result = await stack.client.get(f"/queue/raw/requests/{request_id}")

    assert len(heads) == 1
    assert (result.status_code, result.content) == (200, b"abcd")
    assert result.headers.get("content-encoding") == "compress", "the body is still compress-coded"


async def test_a_gzip_body_that_is_not_gzip_is_a_bad_gateway_after_one_call(stack: Stack) -> None:
    """A body aiohttp's gzip decoder refuses comes as another error than a `br` one (a payload
    error, as for a body cut short), and was still taken for a function out of reach: called at
    every attempt (found by a review)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nabcd"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        final = await stack.wait_for_status("raw", request_id)

    assert (final["attempts"], final["error_type"], len(heads)) == (1, "function_error", 1)
    assert "cannot be read" in final["error"]


async def test_a_body_cut_short_is_still_a_call_to_make_again(stack: Stack) -> None:
    """SPEC §4: a connection closed before a complete response is retried, in a coding or not."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: 40\r\n\r\nx\x9c"
    async with raw_function(stack, answer) as heads:
        request_id = await stack.submit("raw", content=b"x")
        final = await stack.wait_for_status("raw", request_id)

    assert (final["attempts"], final["error_type"], len(heads)) == (3, "runner_unavailable", 3)
    assert "cannot reach function" in final["error"]
