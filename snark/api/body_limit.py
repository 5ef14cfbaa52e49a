"""Cap request bodies at ``SNARK_MAX_BODY_BYTES`` (413) before they are buffered.

A pure ASGI middleware: a declared ``Content-Length`` over the cap is refused before one body byte
is read; a chunked body is counted as it arrives and refused the moment it passes the cap. The app
sees an error from ``receive`` then, which FastAPI reports as an unparsable body (400); the
middleware swaps that response for the 413, so the client learns the real reason.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snark.api.errors import error_response
from snark.errors import PayloadTooLarge


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes the cap; turned into the 413 here."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self):
        return error_response(
            PayloadTooLarge(
                f"The request body is over this server's limit of {self.max_body_bytes} bytes "
                "(SNARK_MAX_BODY_BYTES): send smaller images (or image URLs instead of data: URIs).",
                code="request_too_large",
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return

        received = 0
        over = False
        responded = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal responded
            if over:  # the app's own answer to the failed read (a 400) is replaced by the 413
                if message["type"] == "http.response.start" and not responded:
                    responded = True
                    await self._too_large()(scope, receive, send)
                return
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # whatever the app made of the failed read, the cause is the cap
            if not over or responded:
                raise
            await self._too_large()(scope, receive, send)
