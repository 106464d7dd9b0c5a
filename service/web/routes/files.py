"""`GET /files/<sha256>`: an archived output file, streamed, to whoever may read a prediction
whose output holds it (the admin token, or that prediction's subscriber token): the route's
access, `FILE_READER`, admits the token; `locate` then checks its prediction holds the file."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response, StreamingResponse

from service.archive.files import SHA256, StoredFile, byte_span, file_chunks, find_copy
from service.archive.stores import ArchiveStore
from service.core.auth import ALL_PREDICTIONS, matches_any, token_from, token_prediction
from service.core.errors import Forbidden, NotFound, RelayError, Unauthorized, error_class
from service.core.openapi import ADMIN, SUBSCRIBER, TOKEN_QUERY, errors, operation, path_param
from service.db import store
from service.db.events import open_body
from service.web.auth import Access, Caller, caller_of, route
from service.web.state import relay_of

log = logging.getLogger("relay.files")

StoreUnavailable = error_class("StoreUnavailable", 503, "STORE_UNAVAILABLE")
RangeNotSatisfiable = error_class("RangeNotSatisfiable", 416, "RANGE_NOT_SATISFIABLE")

# The file never changes (its name is its hash), but only token holders may read it: browsers
# may keep it for a year, shared caches may not keep it at all. The sandbox CSP and nosniff
# keep a stored file from ever running as a page on Relay's origin.
FILE_HEADERS = {
    "Cache-Control": "private, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cross-Origin-Resource-Policy": "same-site",
    "Referrer-Policy": "no-referrer",
}


class FileReader(Access):
    """The admin token, or any valid subscriber token: which files it may read depends on its
    prediction's output, which `locate` checks once the file is named."""

    scheme = "file-reader"

    async def admit(self, connection: HTTPConnection) -> Caller:
        settings = relay_of(connection).settings
        token = token_from(connection.headers, connection.query_params)
        if token is None:
            raise Unauthorized("a token is required: ?token=<subscriber token> or Authorization: Bearer")
        if matches_any(token, [settings.admin_token] if settings.admin_token else []):
            return Caller(token=token, admin=True)
        if not settings.subscribe_key:
            raise Forbidden("the token is not valid")
        return Caller(token=token, prediction=token_prediction(token, str(settings.subscribe_key)))


FILE_READER = FileReader()


async def locate(request: Request, sha256: str) -> StoredFile:
    """The copy this caller may read: 403 when its token reads no prediction that holds the file
    (the same answer whether or not the file exists), 404 for the admin."""
    relay = relay_of(request)
    caller = caller_of(request)
    async with relay.pool.acquire() as conn:
        if caller.admin or caller.prediction == ALL_PREDICTIONS:
            found = await find_copy(conn, sha256, relay.vault, admin=True)
        else:
            row = await store.fetch_prediction(conn, str(caller.prediction))
            output_of = open_body(row, relay.vault) if row is not None else None
            found = await find_copy(conn, sha256, relay.vault, output_of)
    if found is None:
        if caller.admin or caller.prediction == ALL_PREDICTIONS:
            raise NotFound(f"no stored file {sha256}")
        raise Forbidden("the subscriber token is for a prediction whose output does not hold this file")
    return found


async def serve_file(request: Request) -> Response:
    sha256 = request.path_params["sha256"]
    if not SHA256.fullmatch(sha256):
        raise NotFound("a file is named by its SHA-256: 64 lower-case hex digits")
    relay = relay_of(request)
    if relay.archive_store is None:
        raise NotFound("the output archive is off (RELAY_ARCHIVE=off)")
    stored = await locate(request, sha256)
    etag = f'"{stored.sha256}"'
    headers = {**FILE_HEADERS, "ETag": etag}
    validators = request.headers.get("if-none-match", "")
    if etag in validators or validators.strip() == "*":  # "*": any current representation matches
        return Response(status_code=304, headers=headers)
    requested = request.headers.get("range")
    if stored.sealed or requested is None or "," in requested or not requested.startswith("bytes="):
        headers["Accept-Ranges"] = "none" if stored.sealed else "bytes"
        headers["Content-Length"] = str(stored.size)
        return await content(request, relay.archive_store, stored, headers)
    span = byte_span(requested, stored.size)
    if span is None:  # an error like any other: without the file's year-long cache header
        raise RangeNotSatisfiable(
            f"the range {requested[:60]!r} is outside the file's {stored.size} bytes",
            headers={"Content-Range": f"bytes */{stored.size}"},
        )
    start, end = span
    headers.update({"Accept-Ranges": "bytes", "Content-Length": str(end - start)})
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{stored.size}"
    return await content(request, relay.archive_store, stored, headers, span, status=206)


async def content(
    request: Request,
    archive: ArchiveStore,
    stored: StoredFile,
    headers: dict[str, str],
    span: tuple[int, int] | None = None,
    status: int = 200,
) -> Response:
    """The file (or its span), streamed. A HEAD only asks the store whether the object is there:
    answering it must not read (and, sealed, decrypt) a whole video that nobody receives."""
    if request.method == "HEAD":
        try:
            present = await archive.exists(stored.object_key)
        except Exception as error:  # noqa: BLE001 - obstore's own classes: S3 unreachable, refusing
            raise unavailable(stored, error) from None
        if not present:
            raise missing(stored)
        return Response(status_code=status, media_type=stored.content_type, headers=headers)
    chunks = await primed(file_chunks(archive, stored, span), stored)
    return StreamingResponse(
        _logged(chunks, stored), status_code=status, media_type=stored.content_type, headers=headers
    )


def missing(stored: StoredFile) -> RelayError:
    log.error("stored file %s is missing from the store; RELAY_ARCHIVE must be shared by every instance",
              stored.sha256)  # fmt: skip
    return NotFound("the stored file is missing from this instance's archive store")


def unavailable(stored: StoredFile, error: Exception) -> RelayError:
    # One line, the class only: the store's error text carries its endpoint and bucket.
    log.error("the archive store cannot be read (%s) for stored file %s", type(error).__name__, stored.sha256)
    return StoreUnavailable(
        "the archive store cannot be read right now; retry later", headers={"Retry-After": "30"}
    )


async def primed(chunks: AsyncIterator[bytes], stored: StoredFile) -> AsyncIterator[bytes]:
    """`chunks` with its first chunk already read, so that an object missing from the store is
    a 404 before any header is sent (not a response cut short)."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except FileNotFoundError:
        raise missing(stored) from None
    except Exception as error:  # noqa: BLE001 - obstore's own classes: S3 unreachable, refusing (403)
        raise unavailable(stored, error) from None

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()


async def _logged(chunks: AsyncIterator[bytes], stored: StoredFile) -> AsyncIterator[bytes]:
    """The body; a file that cannot be read to the end (a damaged object, an unreadable seal)
    is logged and the response cut short, so the client sees an incomplete body, not a wrong one."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:  # a damaged seal, a read error, the store failing mid-stream
        log.error(
            "stored file %s cannot be read (%s); response cut short", stored.sha256, type(error).__name__
        )
        raise


routes = [route("/files/{sha256}", serve_file, access=FILE_READER)]

BYTES = {"schema": {"type": "string", "format": "binary"}}
openapi = {
    "/files/{sha256}": {
        "get": operation(
            "An archived output file",
            tag="files",
            description="To the admin token, or a subscriber token of a prediction whose output holds "
            "the file. Single byte ranges for files stored in clear.",
            security=[SUBSCRIBER, ADMIN],
            parameters=[
                path_param("sha256", "the file's SHA-256", {"type": "string", "pattern": "^[0-9a-f]{64}$"}),
                TOKEN_QUERY,
            ],
            responses={
                200: {"description": "The file, with its content type", "content": {"*/*": BYTES}},
                206: {"description": "The requested range", "content": {"*/*": BYTES}},
                304: {"description": "Not modified (If-None-Match)"},
                **errors(401, 403, 404, 416),
            },
        )
    }
}
