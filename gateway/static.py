"""The dashboard's files: read once from the package, then served by exact name only.

They ship inside the package (package-data ``dashboard/*`` in pyproject.toml): no build
step, and the page loads nothing from outside the daemon. Only the files found there at
start-up are served, each looked up by its exact path, so no request target (``..``,
``%2e%2e``, ``//etc/passwd``) can reach any other file. They are a few tens of KiB, held
in memory.
"""

from __future__ import annotations

import importlib.resources
import posixpath
from typing import Final

import attrs

#: The types the dashboard is made of; a file of any other kind is not served.
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
INDEX: Final = "index.html"


@attrs.frozen
class Asset:
    body: bytes
    content_type: str


def load_dashboard(
    package: str = "sandboxd.gateway", folder: str = "dashboard"
) -> dict[str, Asset]:
    """Every file of the dashboard by the path it is served at ("/app.js"); "/" is the index."""
    assets: dict[str, Asset] = {}
    for entry in (importlib.resources.files(package) / folder).iterdir():
        content_type = CONTENT_TYPES.get(posixpath.splitext(entry.name)[1])
        if content_type is not None and entry.is_file():
            assets["/" + entry.name] = Asset(entry.read_bytes(), content_type)
    index = assets.get("/" + INDEX)
    if index is None:
        raise RuntimeError(f"the package has no {folder}/{INDEX}: reinstall sandboxd")
    assets["/"] = index
    return assets
