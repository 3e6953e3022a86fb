"""A Redis server on 127.0.0.1 for the job queue's tests and benchmarks (Debian's ``redis-server``)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from demo.labelstudio import ManagedProcess, free_port


class RedisServer:
    """``redis-server`` with its data in ``data_dir``, every write appended to disk before it is
    acknowledged (so a restart loses no job), started and stopped by PID."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 20) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make setup installs Debian's redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                       str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
                                       "--save", "", "--protected-mode", "yes"],
                                      {"PATH": "/usr/bin:/bin"}, self.data_dir / "redis.log")
        deadline = time.time() + timeout
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if self.process.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.process.log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process:
            self.process.stop()
            self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop it, stay down ``down_seconds``, start it again on the same port and data."""
        self.stop()
        time.sleep(down_seconds)
        self.start()
