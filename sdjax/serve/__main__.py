"""`python -m sdjax.serve [launch args]`: run the service until SIGTERM/SIGINT, then drain and exit 0.

Drain: readiness goes false, new jobs get 503, the running job finishes (up to --drain-timeout, then it goes
back to the queue), and the process exits. A second signal stops at once (held jobs are handed back).
"""

from __future__ import annotations

import logging
import sys
import threading

import uvicorn

from sdjax.serve.app import create_app
from sdjax.serve.logs import setup_logging
from sdjax.serve.settings import parse_settings

log = logging.getLogger("sdjax.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM meaning "drain, then exit" instead of "stop accepting now"."""

    def __init__(self, config: uvicorn.Config, service, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drainer is None:
            log.info("signal received; draining", extra={"signal": int(sig)})
            self._drainer = threading.Thread(target=self._drain, name="drain", daemon=True)
            self._drainer.start()
        else:
            log.warning("second signal; stopping now", extra={"signal": int(sig)})
            self.should_exit = True

    def _drain(self) -> None:
        try:
            self.service.drain(self.drain_timeout)
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    engine_factory = None
    if settings.multihost:
        from sdjax.serve.engine import resolve_factory
        from sdjax.serve.multihost import follow_forever, leader_factory
        from sdjax.sharding.multihost import is_leader

        if not is_leader():
            log.info("following process 0's engine calls")
            follow_forever(resolve_factory(settings.engine), settings)
            return 0
        engine_factory = leader_factory(resolve_factory(settings.engine))
    if not settings.api_keys:
        log.warning("no API keys configured: the /v1 routes are open (use --api-key or SDJAX_API_KEYS)")
    app = create_app(settings, engine_factory)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, app.state.service, settings.drain_timeout_s)
    log.info("starting", extra={"role": settings.role, "backend": settings.backend, "host": settings.host,
                                "port": settings.port, "model": settings.model or "(embedded default)",
                                "worker": settings.worker_id if settings.runs_worker else None})
    server.run()
    if settings.multihost:
        from sdjax.sharding.multihost import lead

        lead(None, None)  # ends the followers' loops
    return 0


if __name__ == "__main__":
    sys.exit(main())
