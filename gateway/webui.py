"""The page for people at ``/ui/``: the static files shipped inside the package (``gateway/ui/``,
with the browser libraries it bundles under ``vendor/``), and ``/ui/config.json``, which tells the
page whether this gateway wants a bearer token and whether reads need signed URLs.

The page is plain files and calls the same public API as any client (listing, tus uploads,
``?manifest``, ``/admin/locks``, ``POST /admin/sign``); nothing here reads the store.

Must never: serve a file from outside ``gateway/ui/`` (the set of names is fixed when the app is
built, and a request only ever looks a name up in it), let the page load anything from another
origin (its Content-Security-Policy, ``gateway.security.PAGE_CSP``, says so), or tell the page
more than which of tokens and signed reads are on.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.errors import json_error

UI_DIR = Path(__file__).parent / "ui"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page's Content-Security-Policy and the other page headers come from gateway.security
# (PAGE_HEADERS, applied to every /ui answer in gateway.app.decorate_response), one definition for
# every page of the gateway.
UI_HEADERS = {
    # The files change only with the package: revalidate (ETag/Last-Modified) so an upgrade shows.
    "Cache-Control": "no-cache",
}


def ui_files(root: Path = UI_DIR) -> dict[str, Path]:
    """Every servable file under ``root`` by its ``/``-separated relative name."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in _TYPES and not p.name.startswith(".")}


def setup(app: web.Application) -> None:
    files = ui_files()

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/ui/")

    async def serve_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        path = files.get(name)
        if path is None:
            return json_error(404, "not_found", f"/ui/ has no file {name!r}", UI_HEADERS)
        return web.FileResponse(path, headers={**UI_HEADERS, "Content-Type": _TYPES[path.suffix]})

    async def config(request: web.Request) -> web.Response:
        cfg = request.app["config"]
        return web.json_response({"tokens": bool(cfg.auth_token), "signed_reads": bool(cfg.signing_key)},
                                 headers=UI_HEADERS)

    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/config.json", config)
    app.router.add_get("/ui/", serve_file)
    app.router.add_get("/ui/{name:.+}", serve_file)
