"""HTTP face of the App Engine SDK protocol: ``POST /rpc_http`` and AppScale's ``POST /``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from appscale_tq import sdkproto as pb
from appscale_tq.sdk import RpcFailure, SDKService, application_error, check_ticket, parse_envelope

log = Logger()

MAX_SDK_BODY = 32 * 1024 * 1024


class SDKResource(Resource):
    """Answers remote_api calls; always HTTP 200 with a remote_api Response, as the SDK expects.

    ``app``: the one app this endpoint serves (its own ``sdk_listen`` port), or None to tell the
    app from a signed ticket (``secret``), from ``AppData`` where ``trust_appdata`` allows it, or
    — on a node that serves exactly one app and has no secret — that app.
    """

    isLeaf = True

    def __init__(self, service: SDKService, apps: Mapping[str, Any], *, app: str | None = None,
                 secret: str | None = None, trust_appdata: bool = False) -> None:
        super().__init__()
        self._service = service
        self._apps = apps
        self._app = app
        self._secret = secret
        self._trust_appdata = trust_appdata

    def render_POST(self, request: Request) -> Any:  # noqa: N802
        Deferred.fromCoroutine(self._respond(request))
        return NOT_DONE_YET

    def render(self, request: Request) -> Any:
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"text/plain")
            return b"POST a remote_api Request\n"
        return self.render_POST(request)

    def _caller(self, request: Request, envelope: Any) -> str | None:
        """The app making the call, or None when it cannot be told (PERMISSION_DENIED).

        In order: the app of this endpoint (``sdk_listen``); a valid ticket (when the node has a
        secret); on AppScale's legacy ``POST /`` form only, its ``AppData`` header where the
        config trusts it; the only app of a node that has no secret.
        """
        if self._app is not None:
            return self._app
        if self._secret is not None:
            ticket = envelope.request_id or request.getHeader(b"x-appengine-api-ticket") or b""
            app = check_ticket(self._secret, ticket) if ticket else None
            if app is not None:
                return app
        appdata = request.getHeader(b"appdata")
        if appdata is not None and self._trust_appdata and _legacy(request):
            return appdata.decode("utf-8", "replace")
        if self._secret is None and len(self._apps) == 1:
            return next(iter(self._apps))
        return None

    async def _respond(self, request: Request) -> None:
        try:
            body = request.content.read(MAX_SDK_BODY + 1) if request.content else b""
            if len(body) > MAX_SDK_BODY:
                raise RpcFailure(pb.BAD_REQUEST, "request too large")
            envelope = parse_envelope(body)
            app = self._caller(request, envelope)
            if app is None or app not in self._apps:
                answer = application_error(
                    "PERMISSION_DENIED",
                    "the calling app is not known here (ticket, port or AppData)")
            else:
                answer = await self._service.handle(app, envelope)
        except RpcFailure as e:
            response = pb.Response()
            response.rpc_error.code = e.code
            response.rpc_error.detail = e.detail
            answer = response.SerializeToString()
        except Exception:
            log.failure("SDK call failed")
            answer = application_error("INTERNAL_ERROR", "internal error")
        if request._disconnected or request.finished:
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(len(answer)).encode())
        request.write(answer)
        request.finish()


def _legacy(request: Request) -> bool:
    """AppScale's older form of the call: ``POST /`` with ``ProtocolBufferType: Request``."""
    return (request.path.split(b"?", 1)[0] == b"/"
            and request.getHeader(b"protocolbuffertype") is not None)


class Root(Resource):
    """The node's HTTP root: the SDK protocol at /rpc_http (and AppScale's POST / form),
    everything else to the JSON API."""

    isLeaf = True

    def __init__(self, api: Resource, sdk: SDKResource) -> None:
        super().__init__()
        self._api = api
        self._sdk = sdk

    def render(self, request: Request) -> Any:
        path = request.path.split(b"?", 1)[0]
        if path == b"/rpc_http" or (
            path == b"/" and request.getHeader(b"protocolbuffertype") is not None
        ):
            return self._sdk.render(request)
        return self._api.render(request)
