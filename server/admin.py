"""The admin API: the catalog of specialists, changed on a running server (off unless an admin key
is configured; the Guard checks that key on these routes, and only it).

    GET    /v1/specialists          the catalog: version, specialists, index diagnostics
    POST   /v1/specialists          {"name", "path", "probes": [...] | "probes_path", "replace": false}
    DELETE /v1/specialists/{name}

Each change answers with the new catalog (version, specialists, diagnostics); a refused one (4xx,
OpenAI's error body naming the problem) leaves the catalog exactly as it was.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI

from index_store.catalog import CatalogError, Change, check_under_root, read_probe_texts
from .live_catalog import LiveCatalog
from .protocol import SpecialistRequest
from .serving import APIError, draining_error

PREFIX = "/v1/specialists"


def _api_error(e: CatalogError) -> APIError:
    type_ = {403: "permission_error", 404: "not_found_error", 409: "conflict_error",
             503: "service_unavailable"}.get(e.status, "invalid_request_error")
    return APIError(e.status, str(e), type_, e.param)


async def _run(fn, *args):
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except CatalogError as e:
        raise _api_error(e) from None


def under_root(catalog: LiveCatalog, path: str) -> Path:
    """A path from a request: a relative one is taken under ``[catalog].models_root`` (the server's
    working directory means nothing to a client)."""
    p, root = Path(path).expanduser(), catalog.loaded.config.catalog.models_root
    return p if p.is_absolute() or root is None else root / p


def add_admin_routes(app: FastAPI, catalog: LiveCatalog) -> None:
    @app.get(PREFIX)
    async def specialists():
        return catalog.doc()

    def refuse_while_draining():
        if catalog.engine.draining:
            raise draining_error()

    @app.post(PREFIX)
    async def add_specialist(body: SpecialistRequest):
        refuse_while_draining()
        probes = body.probes
        if body.probes_path is not None:
            if probes is not None:
                raise APIError(400, "send one of 'probes' or 'probes_path'", param="probes_path")
            path = under_root(catalog, body.probes_path).resolve()
            try:
                check_under_root(catalog.loaded.config, path, body.probes_path, "probes_path")
                probes = read_probe_texts(path, body.name)
            except CatalogError as e:
                raise _api_error(e) from None
        change = Change("replace" if body.replace else "add", body.name,
                        under_root(catalog, body.path) if body.path else None, probes)
        return await _run(catalog.change, change)

    @app.delete(PREFIX + "/{name}")
    async def remove_specialist(name: str):
        refuse_while_draining()
        return await _run(catalog.change, Change("remove", name))
