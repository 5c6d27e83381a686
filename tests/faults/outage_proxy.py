"""A TCP proxy in front of the S3 server that can be taken down and brought back without losing moto's
in-memory data (restarting moto itself would empty it).

It binds its listening socket once and keeps it for its whole life (no rebinding, so no port race with
other processes): "down" changes what it does with connections, and cuts the open ones:
- `refuse`: every new connection is reset at once (as a server that is not there, or restarting);
- `blackhole`: new connections are accepted and never answered (a hung server, a dead load balancer, or a
  port taken over by something else): the worst case for client timeouts.
Counters (`refused`, `held`, `forwarded`) let tests wait on conditions ("the client hit the outage")
instead of sleeping, and `down_on(pattern)` takes it down at a precise point of a protocol (e.g. when an
MLflow client sends its second `runs/create`), deterministically whatever the machine's speed.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

MODES = ("up", "refuse", "blackhole")


class OutageProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port = host, target_port
        self.mode = "up"
        self.refused = self.held = self.forwarded = 0
        self._open: set[socket.socket] = set()
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._trigger: tuple[bytes, int, str] | None = None  # (pattern, occurrences to let pass, mode)
        self._listener = socket.socket()
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> None:
        """Forward new connections again (connections held by a blackhole are cut)."""
        with self._lock:
            self.mode = "up"
            held, self._held = self._held, []
        for conn in held:
            _reset(conn)

    def down(self, mode: str = "refuse") -> None:
        """Stop serving (`refuse` or `blackhole`) and reset every open connection."""
        if mode not in MODES[1:]:
            raise ValueError(f"mode {mode!r}: expected one of {MODES[1:]}")
        with self._lock:
            self.mode = mode
            open_now, self._open = list(self._open), set()
        for conn in open_now:
            _reset(conn)

    def down_on(self, pattern: bytes, *, after: int = 0, mode: str = "refuse") -> None:
        """Go down (`mode`) when a client sends `pattern` for the `after + 1`-th time; that request is
        dropped, not forwarded."""
        with self._lock:
            self._trigger = (pattern, after, mode)

    def _triggered(self, chunk: bytes) -> bool:
        with self._lock:
            if self._trigger is None or self._trigger[0] not in chunk:
                return False
            pattern, after, mode = self._trigger
            if after > 0:
                self._trigger = (pattern, after - 1, mode)
                return False
            self._trigger = None
        self.down(mode)
        return True

    def close(self) -> None:
        self._closed = True
        self.down("refuse")
        self.up()  # releases held connections
        self._listener.close()

    def hits(self) -> int:
        """Connections that met the outage (refused or held)."""
        return self.refused + self.held

    def wait_for_hits(self, count: int = 1, timeout_s: float = 600) -> bool:
        """Wait until `count` connections met the outage (a condition, polled)."""
        deadline = time.monotonic() + timeout_s
        while self.hits() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.hits() >= count

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "refuse":
                    self.refused += 1
                elif mode == "blackhole":
                    self.held += 1
                    self._held.append(client)
            if mode == "refuse":
                _reset(client)
                continue
            if mode == "blackhole":
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self.mode != "up":  # went down meanwhile
                    self.refused += 1
                    stale = True
                else:
                    self.forwarded += 1
                    self._open.update({client, upstream})
                    stale = False
            if stale:
                _reset(client)
                _reset(upstream)
                continue
            for src, dst, outbound in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, outbound), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if outbound and self._triggered(chunk):
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)


def _reset(conn: socket.socket) -> None:
    """Close with an RST (linger 0), as a crashed or restarting server's connections end."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass
