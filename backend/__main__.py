"""``python -m backend``: serve the app on HOST:PORT (settings from the environment, see README).

    python -m backend                    # serve
    python -m backend check --help       # can Label Studio and this backend reach each other?
    python -m backend health             # exit 0 if the backend on PORT is up (container HEALTHCHECK)

The server is waitress: its I/O thread buffers each request whole (header and body, up to
MAX_REQUEST_BYTES) before a worker thread sees it, so slow or half-open clients cost a
socket, never one of the THREADS that run predictions. Idle connections close after
IDLE_CONNECTION_TIMEOUT; at most MAX_CONNECTIONS are open at once. On SIGTERM or SIGINT the
server stops accepting, lets requests in flight finish for up to GRACEFUL_TIMEOUT seconds,
then stops its training jobs (they register nothing) and exits; a stop that takes STOP_MARGIN_SECONDS longer
than that logs every thread's stack and exits with code 1.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import time

from backend.settings import Settings

log = logging.getLogger("backend.server")
# After GRACEFUL_TIMEOUT, what a stop may still take: its training jobs' SIGTERM-to-SIGKILL (10 s) and the exit.
STOP_MARGIN_SECONDS = 15

FIRST_SETTINGS = """settings a user sets first (environment variables; the README's Settings table has all of them):
  LABEL_STUDIO_URL       Label Studio's address, e.g. http://localhost:8080 (to fetch its images and annotations)
  LABEL_STUDIO_API_KEY   a Label Studio access token (legacy token or personal access token)
  MODEL_DIR              where versions, annotations and caches live (default ./model_dir)
  CLIP_MODEL             an open_clip model name (default ViT-B-16) or a model-config JSON file
  CLIP_PRETRAINED        its weights: a pretrained tag (default openai) or a checkpoint file
  HOST, PORT             where to listen (default 0.0.0.0:9090)"""


def _busy(server) -> bool:
    dispatcher = server.task_dispatcher
    return bool(dispatcher.queue) or dispatcher.active_count > 0


def serve(settings: Settings) -> None:
    from waitress import wasyncore
    from waitress.server import create_server

    from backend.app import create_app

    app = create_app(settings)
    server = create_server(app, host=settings.host, port=settings.port, threads=settings.threads,
                           channel_timeout=int(settings.idle_connection_timeout), cleanup_interval=5,
                           connection_limit=settings.max_connections,
                           max_request_body_size=settings.max_request_bytes, ident="gkc-backend")
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stop_requested.append(number))
    log.info("serving on http://%s:%s with %d threads", settings.host, server.effective_port, settings.threads)
    while not stop_requested:
        wasyncore.loop(timeout=0.5, map=server._map, count=1)
    log.info("signal %d: no new connections; waiting up to %.0f s for requests in flight", stop_requested[0],
             settings.graceful_timeout)
    # A stop never hangs: past its budget every thread's stack goes to the log (where it was stuck), and
    # the process exits with code 1. Its training jobs end with it (backend.training stops with its parent).
    faulthandler.dump_traceback_later(settings.graceful_timeout + STOP_MARGIN_SECONDS, exit=True)
    server.del_channel()  # stop accepting; answered channels stay in the map until they flush
    server.socket.close()
    deadline = time.monotonic() + settings.graceful_timeout
    while (_busy(server) or any(getattr(c, "requests", None) or getattr(c, "total_outbufs_len", 0)
                                for c in list(server._map.values()))) and time.monotonic() < deadline:
        wasyncore.loop(timeout=0.2, map=server._map, count=1)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    app.config["service"].shutdown()
    log.info("stopped")


def health(settings: Settings) -> None:
    """Exit 0 when the backend on 127.0.0.1:PORT answers /health and its model did not fail to load."""
    import requests

    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    try:
        answer = requests.get(f"http://127.0.0.1:{settings.port}/health", auth=auth, timeout=5)
        state = answer.json().get("model_state") if answer.status_code == 200 else f"HTTP {answer.status_code}"
    except (requests.RequestException, ValueError) as error:
        sys.exit(f"health: no answer on port {settings.port} ({error.__class__.__name__})")
    if state not in ("ready", "loading"):
        sys.exit(f"health: {state}")
    print(state)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from backend.check import main as check

        return check(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__, epilog=FIRST_SETTINGS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("serve", "health"), default="serve",
                        help="serve (the default), or health; `check` has its own --help")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as error:  # a setting that can't work: say which, start nothing
        sys.exit(f"backend: {error}")
    if args.command == "health":
        return health(settings)
    return serve(settings)


if __name__ == "__main__":
    main()
