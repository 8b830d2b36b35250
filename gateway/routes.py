"""Which answer for which HTTP request that is not a websocket upgrade. No I/O.

    GET /              the dashboard (index.html)
    GET /NAME          the dashboard's other files (app.js, style.css, ...), by exact name
    GET /metrics       the Prometheus exposition: an admin's bearer token is required unless
                       [server] metrics_public = true (401 without one, 403 for a non-admin's)
    GET /v1            401 without a valid token, else 426: /v1 is the websocket's. A page
                       whose websocket was refused asks this to tell a wrong token from a
                       daemon that is gone: browsers hide a refused handshake's status.
    anything else      404; a method other than GET or HEAD on one of the above, 405

HEAD is answered as GET without the body. The front door (front_door.py) parses the head
(http.py) and sends what ``Routes.respond`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Protocol

from sandboxd.gateway.auth import RESOURCE, Authenticator, User, token_from_handshake
from sandboxd.gateway.http import RequestHead, Response, text
from sandboxd.gateway.static import Asset

METRICS_PATH: Final = "/metrics"

#: The dashboard may load its own files and open a websocket to its own origin, nothing
#: else; no page may frame it. The token never leaves the page in a Referer.
DASHBOARD_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)

_CHALLENGE: Final = ("WWW-Authenticate", 'Bearer realm="sandboxd"')


class MetricsSource(Protocol):
    def render(self, accept: str | None) -> tuple[bytes, str]: ...


class Routes:
    def __init__(
        self,
        assets: Mapping[str, Asset],
        authenticator: Authenticator,
        metrics: MetricsSource,
        *,
        metrics_public: bool = False,
    ) -> None:
        self._assets = assets
        self._authenticator = authenticator
        self._metrics = metrics
        self._metrics_public = metrics_public

    def respond(self, head: RequestHead) -> Response:
        path = head.path
        if path != METRICS_PATH and path != RESOURCE and path not in self._assets:
            return text(404, f"sandboxd has no page {_show(path)}; the dashboard is at /")
        if head.method not in ("GET", "HEAD"):
            return text(405, f"{path} answers GET and HEAD only", ("Allow", "GET, HEAD"))
        if path == METRICS_PATH:
            return self._metrics_page(head)
        if path == RESOURCE:
            return self._websocket_only(head)
        asset = self._assets[path]
        return Response(200, asset.body, asset.content_type, DASHBOARD_HEADERS)

    def _user(self, head: RequestHead) -> User | None:
        return self._authenticator.authenticate(token_from_handshake(head.target, head.headers))

    def _metrics_page(self, head: RequestHead) -> Response:
        if not self._metrics_public:
            user = self._user(head)
            if user is None:
                return text(
                    401,
                    "GET /metrics needs an admin's bearer token (Authorization: Bearer TOKEN)",
                    _CHALLENGE,
                )
            if not user.admin:
                return text(403, "GET /metrics needs an admin's token; this user is no admin")
        accept = head.header(b"accept")
        body, content_type = self._metrics.render(
            None if accept is None else accept.decode("latin-1")
        )
        return Response(200, body, content_type)

    def _websocket_only(self, head: RequestHead) -> Response:
        if self._user(head) is None:
            return text(401, "a valid bearer token is required", _CHALLENGE)
        return text(
            426,
            f"sandboxd speaks its protocol over a websocket at {RESOURCE}",
            ("Upgrade", "websocket"),
        )


def _show(path: str) -> str:
    # A 64 KiB target must not make a 64 KiB answer.
    return repr(path) if len(path) <= 80 else repr(path[:77] + "...")
