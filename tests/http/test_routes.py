"""Which answer for which request, without a socket: the real dashboard files, metrics, tokens."""

from __future__ import annotations

import re

import pytest

from sandboxd.gateway.auth import Authenticator
from sandboxd.gateway.http import HeadReader, RequestHead
from sandboxd.gateway.metrics import Metrics
from sandboxd.gateway.routes import Routes
from sandboxd.gateway.static import load_dashboard
from tests.support import TOKENS, configured_users

ASSETS = load_dashboard()


def routes(*, metrics_public: bool = False) -> Routes:
    return Routes(
        ASSETS, Authenticator(configured_users()), Metrics(), metrics_public=metrics_public
    )


def head(target: str, *headers: tuple[str, str], method: str = "GET") -> RequestHead:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    parsed = HeadReader().feed(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    assert parsed is not None
    return parsed


def bearer(user: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {TOKENS[user]}")


def test_the_dashboard_files_ship_in_the_package() -> None:
    assert {"/", "/index.html", "/app.js", "/client.js", "/charts.js", "/style.css"} <= set(ASSETS)
    index = routes().respond(head("/"))
    assert index.status == 200 and index.content_type == "text/html; charset=utf-8"
    assert b'<script type="module" src="/app.js">' in index.body
    policy = dict(index.headers)["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    script = routes().respond(head("/app.js?v=2"))
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    # Nothing is loaded from outside the daemon: the policy forbids it, and the page's
    # own references are all to its origin.
    html = ASSETS["/"].body.decode()
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references and all(ref.startswith(("/", "#")) for ref in references), references
    for name in ("/app.js", "/client.js", "/charts.js"):
        imports = re.findall(r'from "([^"]*)"', ASSETS[name].body.decode())
        assert all(i.startswith("./") for i in imports), (name, imports)


@pytest.mark.parametrize(
    "target",
    [
        "/../pyproject.toml",
        "/..%2fstatic.py",
        "/%2e%2e/static.py",
        "//etc/passwd",
        "/dashboard/app.js",
        "/static.py",
        "/index.html/",
        "/app.js/..",
        "/nope",
        "/" + "a" * 5000,
    ],
)
def test_no_other_path_serves_a_file(target: str) -> None:
    response = routes().respond(head(target))
    assert response.status == 404
    assert len(response.body) < 200  # a long path is not echoed whole


def test_only_get_and_head() -> None:
    response = routes().respond(head("/", method="POST"))
    assert response.status == 405 and dict(response.headers)["Allow"] == "GET, HEAD"
    assert routes().respond(head("/", method="HEAD")).status == 200
    assert routes().respond(head("/nope", method="DELETE")).status == 404


def test_metrics_need_an_admin_token() -> None:
    r = routes()
    refused = r.respond(head("/metrics"))
    assert refused.status == 401 and "admin" in refused.body.decode()
    assert dict(refused.headers)["WWW-Authenticate"] == 'Bearer realm="sandboxd"'
    assert r.respond(head("/metrics", ("Authorization", "Bearer wrong-token-123456"))).status == 401
    assert r.respond(head("/metrics", bearer("alice"))).status == 403
    ok = r.respond(head("/metrics", bearer("root")))
    assert ok.status == 200 and ok.content_type.startswith("text/plain")
    assert b"sandboxd_build_info{" in ok.body


def test_metrics_public() -> None:
    assert routes(metrics_public=True).respond(head("/metrics")).status == 200


def test_openmetrics_when_asked() -> None:
    ok = routes().respond(
        head("/metrics", bearer("root"), ("Accept", "application/openmetrics-text; version=1.0.0"))
    )
    assert ok.content_type.startswith("application/openmetrics-text")
    assert ok.body.endswith(b"# EOF\n")


def test_v1_without_an_upgrade_tells_a_bad_token_from_a_good_one() -> None:
    r = routes()
    assert r.respond(head("/v1")).status == 401
    assert r.respond(head("/v1?token=nope")).status == 401
    assert r.respond(head(f"/v1?token={TOKENS['bob']}")).status == 426
    upgrade = r.respond(head("/v1", bearer("alice")))
    assert upgrade.status == 426 and dict(upgrade.headers)["Upgrade"] == "websocket"
