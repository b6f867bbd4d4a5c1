"""The interactive API reference pages, /schema (Redoc), /schema/redoc and /schema/swagger,
with their scripts and styles served by the service itself: the pages work with no outside
network (Litestar's defaults load them from public CDNs). The files come from the
openapi-ui-bundles package (Swagger UI and Redoc as published), never copied into this
repository: a new release of the package brings new ones."""

from __future__ import annotations

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import (
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
)
from litestar.static_files import create_static_files_router
from openapi_ui_bundles import redoc, swagger_ui

# Under /schema, the OpenAPI router's own path (service/web/app.py adds these to it).
ASSETS = "/assets"
SWAGGER_ASSETS = f"{ASSETS}/swagger-ui"
REDOC_ASSETS = f"{ASSETS}/redoc"
# The files change only with the package, so browsers may keep them a while.
_CACHE = CacheControlHeader(public=True, max_age=3600)


def render_plugins(schema_path: str) -> list[OpenAPIRenderPlugin]:
    """Redoc at the schema's root and at /redoc, Swagger UI at /swagger; no favicon and no
    web fonts from elsewhere (Redoc falls back to the browser's fonts)."""
    swagger = f"{schema_path}{SWAGGER_ASSETS}"
    return [
        RedocRenderPlugin(
            path=["/", "/redoc"],
            js_url=f"{schema_path}{REDOC_ASSETS}/redoc.standalone.js",
            google_fonts=False,
            favicon="",
        ),
        SwaggerRenderPlugin(
            js_url=f"{swagger}/swagger-ui-bundle.js",
            css_url=f"{swagger}/swagger-ui.css",
            standalone_preset_js_url=f"{swagger}/swagger-ui-standalone-preset.js",
            favicon="",
        ),
    ]


def asset_routers() -> list[Router]:
    """The routes of those files, for the OpenAPI router (not in the OpenAPI document)."""
    return [
        create_static_files_router(
            path,
            directories=[directory],
            name=f"schema-assets-{name}",
            cache_control=_CACHE,
            include_in_schema=False,
        )
        for name, path, directory in (
            ("swagger-ui", SWAGGER_ASSETS, swagger_ui.static_path),
            ("redoc", REDOC_ASSETS, redoc.static_path),
        )
    ]
