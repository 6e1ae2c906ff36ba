"""The OpenAPI document at `/schema/openapi.json`, completed with what Litestar cannot see in the
handlers: the submission options read from headers and query, the answers' JSON Schemas, and the
error answers each route gives (SPEC §2: the document of all of it). Generated, every error was a
400 with fields no answer has, and no submit named an option (found by a SPEC audit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.enums import MediaType
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    RapidocRenderPlugin,
    RedocRenderPlugin,
    StoplightRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.status_codes import HTTP_404_NOT_FOUND
from litestar.utils import ensure_async_callable

from jetspool import __version__
from jetspool.domain import names
from jetspool.domain.functions import Function
from jetspool.domain.views import (
    AsyncCallAnswer,
    CancelAnswer,
    ErrorAnswer,
    FunctionEntry,
    LogsAnswer,
    PurgeAnswer,
    RedeliverAnswer,
    StatusObject,
    SubmitAnswer,
)
from jetspool.gateway.auth import OPEN_PATHS
from jetspool.gateway.intake import NO_RETRY_HEADERS, PRIORITY_HEADERS, TIMEOUT_HEADERS
from jetspool.gateway.routes.dashboard import MAX_RECENT

if TYPE_CHECKING:
    from litestar import Litestar, Response, Router


def openapi_config() -> OpenAPIConfig:
    """Litestar's viewers under `/schema` (ReDoc at its root), and the document at
    `/schema/openapi.json` as `application/json`, the type SPEC §2 gives every JSON body: Litestar
    serves it as `application/vnd.oai.openapi+json` (found by a SPEC audit)."""
    viewers = [RedocRenderPlugin(), SwaggerRenderPlugin(), StoplightRenderPlugin(), RapidocRenderPlugin()]
    documents = [_JsonDocument(media_type=MediaType.JSON), YamlRenderPlugin()]
    return OpenAPIConfig(title="jetspool", version=__version__, path="/schema", render_plugins=[*viewers, *documents])


class _JsonDocument(JsonRenderPlugin):
    """The JSON document's plugin, which also gives the `/schema` router `json_not_found`."""

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)
        router.after_request = ensure_async_callable(json_not_found)


def json_not_found(response: Response[Any]) -> Response[Any]:
    """The `/schema` router's `after_request`: Litestar answers an unknown path under it with an
    HTML page, where SPEC §2 gives every error a JSON body with `detail` (found by a security
    audit). On that router alone: on the app, it also took a function's own `text/html` 404,
    relayed by the proxy or the result route, for that page (found by a review)."""
    if response.status_code == HTTP_404_NOT_FOUND and response.media_type == MediaType.HTML:
        raise NotFoundException
    return response


_TYPES: Final = (
    Function,
    ErrorAnswer,
    SubmitAnswer,
    StatusObject,
    CancelAnswer,
    AsyncCallAnswer,
    RedeliverAnswer,
    FunctionEntry,
    PurgeAnswer,
    LogsAnswer,
)
_REF: Final = "#/components/schemas/{name}"
_WITH_BODY: Final = frozenset({"post", "put", "patch"})
"""The methods whose body the document describes (OpenAPI gives a GET's or DELETE's none)."""

_OPTION_HEADERS: Final = [
    *((h, "priority class: high, normal (default) or low", {"enum": list(names.PRIORITIES)}) for h in PRIORITY_HEADERS),
    *((h, "start deadline in seconds (decimal digits, under 366 days)", {"type": "string"}) for h in TIMEOUT_HEADERS),
    *(
        (h, "1, true or yes: a single attempt, no retries (0, false or no: retries; else 422)", {"type": "string"})
        for h in NO_RETRY_HEADERS
    ),
    ("Idempotency-Key", "1 to 256 characters: a repeat returns the first request", {"type": "string"}),
    (names.H_CALLBACK_URL, "URL that receives the function's response (OpenFaaS callback)", {"type": "string"}),
]
_OPTION_QUERY: Final = {
    "fal_webhook": "URL that receives fal's webhook JSON",
    "webhook": "the same as fal_webhook",
    "webhookEndpoint": "the same as X-Callback-Url",
    "max_queue_length": "refuse with 429 when this many requests of the function wait",
    "fal_max_queue_length": "the same as max_queue_length",
}
"""The query options of a submit (`intake.CONTROL_QUERY`, described)."""
_SUBMIT_ERRORS: Final = {
    413: "the body is larger than gateway.max_body_size",
    422: "an invalid option or callback URL",
    429: "max_queue_length requests wait, or the API key's rate limit",
    431: "headers, query and callback URLs too large for a queue message",
    503: "the queue cannot store the request now; retry",
}


def complete_openapi(app: Litestar) -> None:
    """Complete the app's OpenAPI document in place (Litestar builds it once and serves that)."""
    document = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    refs, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    document.setdefault("components", {}).setdefault("schemas", {}).update(components)
    schema = dict(zip((t.__name__ for t in _TYPES), refs, strict=True))
    for path, item in document["paths"].items():
        for method, operation in item.items():
            _complete(path, method, operation, schema)
    document["paths"].update(_SCHEMA_PATHS)
    document["components"]["securitySchemes"] = _SECURITY_SCHEMES
    document["security"] = [{scheme: []} for scheme in _SECURITY_SCHEMES]


_SECURITY_SCHEMES: Final = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key, when auth.api_keys is set"},
    "key": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "`Key <key>`, fal-client's form of the same API key",
    },
}
"""SPEC §7's two forms of an API key; the routes open without one say `security: []` (found by an audit:
the document named no scheme)."""
_SCHEMA_PATHS: Final = {
    "/schema": {"get": {"summary": "the API docs page", "security": [], "responses": {"200": {"description": "HTML"}}}},
    "/schema/openapi.json": {
        "get": {
            "summary": "this document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {"schema": {}}}}},
        }
    },
}
"""The routes of the document itself, which Litestar leaves out of it (SPEC §2 lists them)."""


def _complete(path: str, method: str, operation: dict[str, Any], schema: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation["responses"]
    error = schema["ErrorAnswer"]
    _input_errors(path, method, responses, error)
    if _is_submit(path, method):
        _submit(path, method, operation, error)
    if method in _WITH_BODY:  # gateway.max_body_size holds for every body (found by an audit: declared on submits only)
        responses.setdefault("413", _json(_SUBMIT_ERRORS[413], error))
    _answers(path, method, responses, schema)
    if path.startswith("/system/functions"):
        _admin(path, method, operation, schema)
    _guards(path, operation, error)
    if "429" in responses:  # a full queue and a key's rate limit both say when to come back
        responses["429"].setdefault("headers", {})[names.H_RETRY_AFTER] = _RETRY_AFTER_HEADER
    if "{request_id}" in path:  # SPEC §2: every answer about a request names it
        for answer in responses.values():
            answer.setdefault("headers", {})[names.H_REQUEST_ID] = _REQUEST_ID_HEADER


def _input_errors(path: str, method: str, responses: dict[str, Any], error: dict[str, Any]) -> None:
    """The errors of the path's parameters."""
    if "400" in responses:  # Litestar's own, for a route with parameters: its body is ours
        responses["400"] = _json("invalid input", error)
    if "{request_id}" in path:
        responses["404"] = _json("no such request (of this function)", error)
        responses["422"] = _json("a malformed request id", error)
    elif "{name}" in path:
        if path == "/system/functions/{name}" and method == "put":  # a PUT registers it
            responses["422"] = _json("an invalid function entry or name", error)
        else:
            responses["404"] = _json("no such function (a name no function may have included)", error)


def _submit(path: str, method: str, operation: dict[str, Any], error: dict[str, Any]) -> None:
    """A submit's body, its options and the errors they may bring."""
    if method in _WITH_BODY:
        body = {"description": "the function's input, passed on as sent (any type)", "content": {"*/*": {}}}
        operation["requestBody"] = {**body, "required": False}
    parameters = operation.setdefault("parameters", [])
    if path.startswith("/function/"):  # a submit with ?async=true only
        what = "1, true or yes: queue the call (202) instead of calling now; the options below apply then"
        parameters.append({"name": "async", "in": "query", "required": False, "description": what})
        parameters[-1]["schema"] = {"type": "string"}
    parameters.extend(_options())
    for code, what in _SUBMIT_ERRORS.items():
        operation["responses"][str(code)] = _json(what, error)


def _guards(path: str, operation: dict[str, Any], error: dict[str, Any]) -> None:
    """What the API keys (or a logs URL's token) answer."""
    responses = operation["responses"]
    if path in OPEN_PATHS or path.startswith("/schema"):
        operation["security"] = []
    elif path.endswith("/logs"):
        operation["security"] = []
        what = "the token of the request's X-Logs-Url, no API key"
        parameters = operation.setdefault("parameters", [])
        if not any(p.get("name") == "token" for p in parameters):
            parameters.append({"name": "token", "in": "query", "required": True, "description": what})
            parameters[-1]["schema"] = {"type": "string"}
        responses["401"] = _json("the logs URL's token is missing or wrong", error)
    else:
        responses["401"] = _json("an API key is required (when auth.api_keys is set)", error)
        responses.setdefault("429", _json("the API key's rate limit (auth.rate_limit)", error))
        if path.startswith("/system/"):
            responses["403"] = _json("this route needs an admin key", error)


_FULL: Final = "this gateway holds `gateway.max_streams` streams and waits already (Retry-After: 1)"


def _answers(path: str, method: str, responses: dict[str, Any], schema: dict[str, Any]) -> None:
    """The success answers Litestar could not read off the handlers (they return a `Response`)."""
    if "{request_id}" in path:
        _request_answers(path, responses, schema)
    elif path.startswith(("/queue/{name}", "/fal/queue/submit/")) and method == "post":
        responses["200"] = _json("stored: the request's id and URLs", schema["SubmitAnswer"])
    elif path.startswith("/function/"):
        responses["200"] = {"description": "the function's response, as it answered", "content": {"*/*": {}}}
        # The function answers with any status it likes, a 204 or a 405 too (found by an audit).
        responses["default"] = {"description": "the function's own answer, with its status", "content": {"*/*": {}}}
        responses["202"] = _json("queued (?async=true)", schema["AsyncCallAnswer"])
        responses["502"] = _json("the function cannot be reached", schema["ErrorAnswer"])
        responses["504"] = _json("the function did not answer within its timeout", schema["ErrorAnswer"])
    elif path.startswith("/async-function/"):
        responses["202"] = {"description": "stored; its id is in X-Call-Id", "headers": _call_id_headers()}
    elif path == "/system/dashboard/events":
        responses["200"] = _sse("Server-Sent Events: the latest status-change events, then each new one")
        responses["503"] = _json(_FULL, schema["ErrorAnswer"])
        responses["422"] = _json(f"`limit` is out of its range, 0 to {MAX_RECENT}", schema["ErrorAnswer"])
    elif path == "/readyz":
        responses["503"] = {"description": "not connected to NATS, or NATS does not answer"}


def _request_answers(path: str, responses: dict[str, Any], schema: dict[str, Any]) -> None:
    """The answers of the routes about one request."""
    if path.endswith(("/status", "/get")):
        responses["200"] = _json("the status object of a completed request", schema["StatusObject"])
        responses["202"] = _json("the status object of a waiting or running request", schema["StatusObject"])
    elif path.endswith("/status/stream"):
        responses["200"] = _sse("Server-Sent Events: the status object, then one per change, until COMPLETED")
        responses["503"] = _json(_FULL, schema["ErrorAnswer"])
    elif path.endswith("/cancel"):
        responses["202"] = _json("cancellation requested", schema["CancelAnswer"])
        responses["400"] = _json("already completed", schema["CancelAnswer"])
        responses["404"] = _json("no such request (of this function)", schema["CancelAnswer"])
    elif path.endswith("/retry"):
        responses["202"] = _json("a new run is queued", schema["SubmitAnswer"])
    elif path.endswith("/logs"):
        responses["202"] = _json("lines stored", schema["LogsAnswer"])
    elif path.endswith("/callback/redeliver"):
        responses["202"] = _json("callbacks sent again", schema["RedeliverAnswer"])
    else:  # the result route
        _result_answers(responses, schema["ErrorAnswer"])


def _result_answers(responses: dict[str, Any], error: dict[str, Any]) -> None:
    """The result route's answers. Besides its own (JSON), it gives the function's answer, with the
    function's status and content type: any status, a function error's too (SPEC §5). Declared as
    JSON errors alone, a function's 404 or 409 (answered as 400) did not fit the document (found
    by an outside audit)."""
    function_answer: dict[str, Any] = {}  # any body: a schema of binary strings failed a JSON answer (an audit)
    own = {
        "400": "not completed yet (`status` says where it stands); or the function's 408 or 409 (X-Function-Status)",
        "404": "no such request (of this function); or the function's own 404",
        "503": "runner_unavailable: the function could not be reached (its 502-504 are retried, never relayed)",
        "504": "function_timeout or request_timeout (then with X-Request-Timeout-Type: user)",
    }
    for code, what in own.items():
        responses[code] = _json(what, error)
        if code in {"400", "404"}:  # or the function's own answer
            responses[code]["content"]["*/*"] = function_answer
    responses["200"] = {"description": "the function's response, as it answered", "content": {"*/*": function_answer}}
    responses["default"] = {
        "description": "the function's own answer, with its status: a success (2xx) or a function error (SPEC §5)",
        "content": {"*/*": function_answer},
        "headers": {
            header: {"description": what, "schema": {"type": "string"}} for header, what in _RESULT_HEADERS.items()
        },
    }


_RESULT_HEADERS: Final = {
    names.H_ERROR_TYPE: "an error outcome's type (function_error, runner_unavailable, ...)",
    names.H_FAL_ERROR_TYPE: "the same, by fal's name",
    names.H_FUNCTION_STATUS: "the function's own status code, when the answer's differs (408, 409 → 400)",
}
_REQUEST_ID_HEADER: Final = {"description": "the request's id", "schema": {"type": "string"}}
_RETRY_AFTER_HEADER: Final = {"description": "seconds to wait before trying again", "schema": {"type": "string"}}


def _is_submit(path: str, method: str) -> bool:
    if path.startswith("/function/"):
        return method not in {"head", "options"}
    if method != "post" or "/requests/" in path:
        return False
    return path.startswith(("/queue/{name}", "/async-function/", "/fal/queue/submit/"))


def _options() -> list[dict[str, Any]]:
    headers = [
        {"name": name, "in": "header", "required": False, "description": what, "schema": value}
        for name, what, value in _OPTION_HEADERS
    ]
    query = [
        {"name": name, "in": "query", "required": False, "description": what, "schema": {"type": "string"}}
        for name, what in _OPTION_QUERY.items()
    ]
    return headers + query


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _sse(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/event-stream": {"schema": {"type": "string"}}}}


def _call_id_headers() -> dict[str, Any]:
    return {header: {"description": "the request's id", "schema": {"type": "string"}} for header in _ID_HEADERS}


_ID_HEADERS: Final = (names.H_CALL_ID, names.H_REQUEST_ID)


def _admin(path: str, method: str, operation: dict[str, Any], schema: dict[str, Any]) -> None:
    """The registry routes' bodies and answers: Litestar saw only `dict` (found by an audit: no
    route named `FunctionEntry` and its `stats`, and POST and PUT had no request body)."""
    responses, entry, error = operation["responses"], schema["FunctionEntry"], schema["ErrorAnswer"]
    if path.endswith("/purge"):
        responses["200"] = _json("each waiting request completed as cancelled; how many", schema["PurgeAnswer"])
    elif method == "get" and path == "/system/functions":
        responses["200"] = _json("every registered function", {"type": "array", "items": entry})
    elif method == "get":
        responses["200"] = _json("the function's entry and live queue figures", entry)
    elif method in {"post", "put"}:
        content = {"application/json": {"schema": schema["Function"]}}
        operation["requestBody"] = {"description": "the function (SPEC §1)", "required": True, "content": content}
        responses.pop("400", None)
        if method == "post":
            responses["201"] = _json("registered", entry)
            responses["200"] = _json("exactly this entry was registered already (a repeated POST)", entry)
            responses["400"] = _json("another entry of this name is registered: PUT replaces it", error)
        else:
            responses["200"] = _json("replaced", entry)
            responses["201"] = _json("registered", entry)
            responses["400"] = _json("the body names another function than the path", error)
        responses["422"] = _json("an invalid entry: a bad name, URL or field, an unknown key, or not JSON", error)
