"""``python -m backend``: serve the app with gunicorn (WORKERS, THREADS, HOST, PORT)."""
from __future__ import annotations

from gunicorn.app.base import BaseApplication

from backend.settings import Settings


class _Server(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self):
        s = self.settings
        self.cfg.set("bind", f"{s.host}:{s.port}")
        self.cfg.set("workers", s.workers)
        self.cfg.set("threads", s.threads)
        self.cfg.set("timeout", 0)  # predictions of big batches may take long; Label Studio has its own timeout
        self.cfg.set("loglevel", s.log_level.lower())
        self.cfg.set("accesslog", "-")

    def load(self):
        from backend.app import create_app

        return create_app(self.settings)


def main() -> None:
    _Server(Settings()).run()


if __name__ == "__main__":
    main()
