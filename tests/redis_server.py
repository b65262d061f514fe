"""A real redis-server for the tests: started on a free loopback port in a temporary
directory (``appendonly yes``, no snapshots), killed, paused, restarted and finally stopped
and removed by the tests themselves. Nothing here touches a system service.

Usable without pytest (the benchmark starts one too)::

    with RedisServer.started() as server:
        print(server.url("team-a"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["RedisServer", "free_port", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """The redis-server to run: ``$LMMS_CACHE_TEST_REDIS_SERVER``, else the one on PATH."""
    return os.environ.get("LMMS_CACHE_TEST_REDIS_SERVER") or shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on ``127.0.0.1:<port>`` with its data in ``directory``.

    Args:
        directory: its ``--dir`` (the append-only file lives there); kept across restarts.
        options: more ``--name value`` settings, e.g. ``("--maxmemory", "50mb")``.
        unix_socket: also listen on ``<directory>/redis.sock``.
    """

    def __init__(self, directory: str | os.PathLike[str], options: Sequence[str] = (), *,
                 unix_socket: bool = False) -> None:  # fmt: skip
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.options = list(options)
        self.socket_path = str(self.directory / "redis.sock") if unix_socket else None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    @contextlib.contextmanager
    def started(cls, options: Sequence[str] = (), *, unix_socket: bool = False) -> Iterator[RedisServer]:
        """A server in a temporary directory, stopped and removed on the way out."""
        with tempfile.TemporaryDirectory(prefix="lmc-redis-") as directory:
            server = cls(directory, options, unix_socket=unix_socket)
            try:
                server.start()
                yield server
            finally:
                server.stop()

    def url(self, prefix: str = "test", *, password: str | None = None, db: int = 0) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}?prefix={prefix}"

    @property
    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart on the same port: the data is read back from the append-only file)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("already running")
        for _ in range(5):
            if not self.port:  # a restart keeps its port
                self.port = free_port()
            args = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--logfile", "redis.log", "--protected-mode", "yes", "--maxmemory-policy", "noeviction",
            ]  # fmt: skip
            if self.socket_path:
                args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
            args += self.options
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
            if self._wait_ready(timeout):
                return
            self.kill()
            if "Address already in use" not in self.log:
                break
            self.port = 0  # another process took the port: another one
        raise RuntimeError(f"redis-server did not start:\n{self.log[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.02)
        return False

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING (and has loaded its data; a server with a
        password answers NOAUTH)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self, **options: object):  # type: ignore[no-untyped-def]
        """A redis-py client of our own, to inspect or configure the server."""
        import redis

        options.setdefault("socket_timeout", 10)
        return redis.Redis(host="127.0.0.1", port=self.port, **options)  # type: ignore[arg-type]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM killer does (no shutdown, no last write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process must be able to die
            self.process.kill()
            self.process.wait(30)
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: a hung server (the kernel still accepts connections)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
