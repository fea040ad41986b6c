"""Dashboards for compliance officers and analysts, served by the API app under /dashboards.

Server-rendered pages (Jinja2) with charts drawn by the plotly.js that the installed plotly
package ships, served from this app: no CDN, nothing fetched from elsewhere. The CLI mounts
them onto the API (``mount_dashboards``), so the server never imports this package.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, status
from fastapi.responses import FileResponse

from fedsynth.dashboards import analyst, compliance, login
from fedsynth.dashboards.site import PREFIX, Site

STATIC = Path(__file__).parent / "static"
#: Files under /dashboards/static/: ours, and plotly.js from the plotly package.
_STATIC_FILES = {"dashboards.css": "text/css", "dashboards.js": "text/javascript"}


def plotly_js() -> Path:
    """plotly.min.js as the installed plotly package ships it."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def mount_dashboards(app: FastAPI) -> None:
    """Add the dashboard pages to an app made by ``fedsynth.server.api.app.create_app``."""
    site = Site(app.state.services)
    site.install(app)
    plotly_name = f"plotly-{metadata.version('plotly')}.min.js"
    site.templates.env.globals["plotly_js"] = f"{PREFIX}/static/{plotly_name}"

    @app.get(PREFIX + "/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        # Versioned names never change content: browsers may keep them for a day.
        cache = {"Cache-Control": "public, max-age=86400"}
        if name == plotly_name:
            return FileResponse(plotly_js(), media_type="text/javascript", headers=cache)
        if name in _STATIC_FILES:
            return FileResponse(STATIC / name, media_type=_STATIC_FILES[name], headers=cache)
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")

    for module in (login, compliance, analyst):
        app.include_router(module.routes(site), prefix=PREFIX, include_in_schema=False)
