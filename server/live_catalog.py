"""The running server's catalog: the specialists it composes now, changed through the admin API or
picked up from the shared config folder (replicas).

A change (``index_store.catalog.apply``: a new snapshot, then the config rewritten by rename) is
made off the engine thread, with the server's own generalist (only the changed domain's probes are
fingerprinted and only the specialists are loaded), then swapped into the engine
(``Engine.swap``): running requests finish on the catalog they started with, requests admitted
after the swap compose over the new one. A watcher thread polls the config file; when another
process (a replica's admin API, ``constellation specialist``) committed a newer version, this
server loads it and swaps the same way, within about one poll interval plus the load.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from index_store.catalog import CatalogError, Change, apply, listing
from index_store.config import load_config

log = logging.getLogger("constellation.catalog")
SWAP_TIMEOUT_S = 60.0


class LiveCatalog:
    def __init__(self, loaded, engine, metrics=None):
        self.loaded, self.engine, self.metrics = loaded, engine, metrics
        # a constellation assembled in code (benchmarks) has no config: its catalog cannot change
        self.path: Path | None = loaded.config.source if loaded.config is not None else None
        self.lock = threading.Lock()  # one change or reload at a time in this process (flock: across)
        self.stopped = threading.Event()
        self.failed: int | None = None  # a committed version this server could not load (not retried)
        self._gauge()

    @property
    def version(self) -> int:
        return int(self.loaded.config.catalog.version) if self.loaded.config is not None else 0

    @property
    def manifest(self) -> dict:
        return self.loaded.manifest

    def listing(self) -> list[dict]:
        if self.loaded.config is None:
            return []
        rows = listing(self.loaded.config, self.loaded.manifest)
        resident = self.loaded.constellation.resident_bytes()
        for r in rows:
            r["resident_bytes"] = int(resident.get(r["name"], 0))
        return rows

    def doc(self) -> dict:
        """What the admin API answers: the version, the specialists, the index diagnostics."""
        from index_store.store import diagnostics_doc

        return {"catalog_version": self.version, "specialists": self.listing(),
                "index": diagnostics_doc(self.loaded.manifest)}

    # ---- changes -----------------------------------------------------------------------------------
    def change(self, change: Change) -> dict:
        """Apply and commit ``change``, then serve it (blocking; run it off the event loop)."""
        if self.path is None:
            raise CatalogError("this server was not started from a config file; its catalog cannot change", 409)
        with self.lock:
            t0 = time.perf_counter()
            g = self.loaded.constellation.g
            result = apply(self.path, change, generalist=(g, self.loaded.tokenizer), root_only=True)
            self._serve(result.config)
            log.info("catalog version %d: %s %s in %.1f s", self.version, change.op, change.name,
                     time.perf_counter() - t0)
            return self.doc()

    def refresh(self) -> bool:
        """Serve the config file's catalog if it is newer than ours (another process changed it)."""
        if self.path is None:
            return False
        with self.lock:
            try:
                cfg = load_config(self.path)
            except Exception as e:  # noqa: BLE001 - a half-edited file by hand: keep serving, say so
                log.warning("catalog: cannot read %s: %s", self.path, e)
                return False
            if cfg.catalog.version <= self.version or cfg.catalog.version == self.failed:
                return False
            try:
                self._serve(cfg)
            except Exception:
                self.failed = cfg.catalog.version  # said once (the watcher logs it); the next version is tried
                raise
            log.info("catalog version %d picked up from %s", self.version, self.path)
            return True

    def _serve(self, cfg) -> None:
        from index_store.loader import load_constellation

        new = load_constellation(cfg, generalist=self.loaded)
        swapped = self.engine.swap(new.constellation, timeout=SWAP_TIMEOUT_S)
        self.loaded = new  # committed: the engine serves it from its next quiet step on
        self._gauge()
        if not swapped:
            raise CatalogError(f"catalog version {self.version} is committed, but the engine has not swapped to it "
                               f"within {SWAP_TIMEOUT_S:.0f} s (it does once no prompt is being prefilled)", 503)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.catalog_version.set(self.version)

    # ---- replicas ----------------------------------------------------------------------------------
    def watch(self, every_s: float) -> threading.Thread:
        """Poll the config file every ``every_s`` seconds on a daemon thread (until ``stop``)."""

        def loop():
            while not self.stopped.wait(every_s):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - keep serving the current catalog
                    log.exception("catalog: reloading %s failed; still serving version %d", self.path,
                                  self.version)

        t = threading.Thread(target=loop, name="catalog-watch", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.stopped.set()
