"""vLLM's KV-cache events in: one ZMQ SUB socket per router process, bound on 127.0.0.1, that
every replica's engine connects to, feeding a :class:`~nbkit.policies.kv_index.KVIndex`.

    index = KVIndex()
    events = KVEventSubscriber(index, port=5557)        # binds tcp://127.0.0.1:5557 (+1 per DP rank)
    events.add_source("replica0", replay_port=8200)     # topic "replica0"; replays its history
    events.start()                                      # a daemon thread receives and applies
    ...
    events.close()

Wire format (vLLM 0.32, ``vllm/distributed/kv_events.py``): multipart ``[topic, 8-byte big-endian
sequence, msgpack payload]``, the payload ``[ts, [event, ...], data_parallel_rank]``. Each DP rank
publishes with its own sequence, to the endpoint's port + its rank. Events of a rank are applied
in sequence order; a skipped number is counted as a gap and makes the rank's index cold.

A router that starts after the replicas does not start blind: for each source it asks the
engine's replay endpoint (a ROUTER socket bound on 127.0.0.1) for every batch from sequence 0,
holding live batches back until the replay ends. An engine that has published nothing answers
with the end marker alone: its cache is known empty. If the replay buffer no longer starts at 0,
the rank is cold and the policy falls back (and says so).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

END_SEQ = -1
#: How long live batches are held back waiting for a replay to end before they are applied anyway.
REPLAY_WAIT_S = 30.0


@dataclass
class _Source:
    topic: str
    dp_size: int = 1
    replay_port: int | None = None
    names: dict[int, str] = field(default_factory=dict)  # DP rank -> rank name
    pending: dict[int, list] = field(default_factory=dict)  # DP rank -> live batches held during a replay
    replay_started: dict[int, float] = field(default_factory=dict)
    sockets: dict[int, object] = field(default_factory=dict)  # DP rank -> DEALER for the replay (thread's)

    def rank_name(self, dp: int | None) -> str:
        dp = dp or 0
        return self.names.get(dp) or (self.topic if self.dp_size == 1 else f"{self.topic}/dp{dp}")


class KVEventSubscriber:
    """Receives KV-cache event batches on a daemon thread and applies them to ``index``."""

    def __init__(self, index, *, port: int, dp_ports: int = 1, host: str = "127.0.0.1"):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host={host!r}: the KV-event socket binds a loopback address only")
        self.index, self.host, self.port, self.dp_ports = index, host, int(port), max(1, int(dp_ports))
        self.sources: dict[str, _Source] = {}
        self.counters = {"batches": 0, "events": 0, "gaps": 0, "undecodable": 0, "unknown_topic": 0, "replays": 0}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ctx = None
        self._sub = None
        self._wake_r = self._wake_w = None
        self._decode = None
        self._poller = None
        self._replay_socks: dict = {}   # DEALER socket -> (topic, DP rank); the thread's alone
        self._retired: list = []        # sockets of replaced sources, closed by the thread
        self.started_at: float | None = None

    @property
    def endpoints(self) -> list[str]:
        return [f"tcp://{self.host}:{self.port + d}" for d in range(self.dp_ports)]

    # -- sources ---------------------------------------------------------------------------------
    def add_source(self, topic: str, *, dp_size: int = 1, replay_port: int | None = None,
                   names: dict[int, str] | None = None) -> None:
        """Expect events on ``topic`` (a replica) from ``dp_size`` DP ranks; with ``replay_port`` its
        history is replayed first. ``names`` maps a DP rank to its rank name (default: the topic,
        or ``topic/dp<r>``). Adding a topic again (a restarted replica) starts over: its ranks are
        forgotten and replayed."""
        src = _Source(topic, dp_size, replay_port, dict(names or {}))
        with self._lock:
            old = self.sources.get(topic)
            if old is not None:
                self._retired.extend(old.sockets.values())
            self.sources[topic] = src
            for d in range(dp_size):
                self.index.forget(src.rank_name(d))
                if replay_port is None:
                    self.index.mark_cold(src.rank_name(d), "no replay endpoint: history unknown until a restart")
        self._wake()

    def remove_source(self, topic: str) -> None:
        with self._lock:
            src = self.sources.pop(topic, None)
            if src is not None:
                self._retired.extend(src.sockets.values())
                for d in range(src.dp_size):
                    self.index.forget(src.rank_name(d))

    @property
    def replayed(self) -> bool:
        """True once every DP rank of every source with a replay endpoint has its replay behind it
        (answered, or given up on ``REPLAY_WAIT_S`` after it began while live batches waited): from
        then on the index is as complete as the engines' replay buffers allow (:meth:`KVIndex.snapshot`
        says which ranks are warm)."""
        with self._lock:
            sources = list(self.sources.values())
        return all(src.replay_started.get(d, 0) < 0 for src in sources if src.replay_port is not None
                   for d in range(src.dp_size))

    def wait_replayed(self, timeout: float, poll: float = 0.02) -> bool:
        """Wait until :attr:`replayed` (True) or ``timeout`` seconds (False); needs :meth:`start`."""
        deadline = time.monotonic() + timeout
        while not self.replayed:
            if self._thread is None or time.monotonic() >= deadline:
                return self.replayed
            time.sleep(poll)
        return True

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "KVEventSubscriber":
        """Bind the SUB socket (raises if a port is taken) and start the receiving thread."""
        if self._thread is not None:
            return self
        import msgspec
        import zmq

        self._decode = msgspec.msgpack.Decoder().decode
        self._ctx = zmq.Context()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt_string(zmq.SUBSCRIBE, "")
        try:
            for ep in self.endpoints:
                sub.bind(ep)
        except zmq.ZMQError as e:
            sub.close()
            self._ctx.term()
            self._ctx = None
            raise ValueError(f"kv_events_port={self.port}: cannot bind {self.host}:{self.port}..: {e}") from None
        self._sub = sub
        self._wake_r = self._ctx.socket(zmq.PAIR)
        self._wake_r.bind(f"inproc://nbkit-kv-wake-{id(self)}")
        self._wake_w = self._ctx.socket(zmq.PAIR)
        self._wake_w.connect(f"inproc://nbkit-kv-wake-{id(self)}")
        self._stop.clear()
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name="nbkit-kv-events", daemon=True)
        self._thread.start()
        log.info("kv events: listening on %s", ", ".join(self.endpoints))
        return self

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        self._thread = None

    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            with self._lock:
                try:
                    w.send(b"", flags=1)  # zmq.NOBLOCK
                except Exception:  # noqa: BLE001 - the thread is waking anyway
                    pass

    # -- the receiving thread --------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        poller = self._poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._reconcile()
                for sock, _ in poller.poll(500):
                    if sock is self._wake_r:
                        self._wake_r.recv()
                    elif sock is self._sub:
                        for _ in range(1000):  # drain what is there, then look at the rest
                            try:
                                frames = self._sub.recv_multipart(flags=zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self._on_live(frames)
                    else:
                        self._on_replay(sock)
                self._expire_replays()
        except Exception:  # noqa: BLE001 - a dead receiver must say so: every rank turns cold
            log.exception("kv events: the receiving thread failed; the KV index is cold from now on")
            for src in list(self.sources.values()):
                for d in range(src.dp_size):
                    self.index.mark_cold(src.rank_name(d), "the KV-event receiver stopped")
        finally:
            with self._lock:
                self._retired.extend(self._replay_socks)
            self._reconcile(open_new=False)
            for s in (self._sub, self._wake_r, self._wake_w):
                if s is not None:
                    s.close(linger=0)
            self._sub = self._wake_r = self._wake_w = None
            self._ctx.term()
            self._ctx = None

    def _batch(self, frames) -> tuple[str, int, list, int | None] | None:
        if len(frames) != 3:
            self.counters["undecodable"] += 1
            return None
        topic, seq_b, payload = frames
        try:
            seq = int.from_bytes(seq_b, "big", signed=True)
            batch = self._decode(payload)
            events = batch[1]
            dp = batch[2] if len(batch) > 2 else None
        except Exception:  # noqa: BLE001 - a batch we cannot read: counted, and the gap shows it
            self.counters["undecodable"] += 1
            return None
        return topic.decode("utf-8", "replace"), seq, events, dp

    def _on_live(self, frames) -> None:
        got = self._batch(frames)
        if got is None:
            return
        topic, seq, events, dp = got
        src = self.sources.get(topic)
        if src is None:
            self.counters["unknown_topic"] += 1
            return
        d = dp or 0
        if d in src.pending:  # a replay of this rank is under way: apply after it
            src.pending[d].append((seq, events))
            return
        self._apply(src, d, seq, events)

    def _apply(self, src: _Source, d: int, seq: int, events, replay: bool = False) -> None:
        name = src.rank_name(d)
        skipped = self.index.apply_batch(name, seq, events, replay=replay)
        self.counters["batches"] += 1
        self.counters["events"] += len(events)
        if skipped:
            self.counters["gaps"] += skipped
            log.warning("kv events: %s skipped %d batch(es) before sequence %d; its index is cold", name, skipped, seq)

    # -- replays ---------------------------------------------------------------------------------
    def _reconcile(self, open_new: bool = True) -> None:
        """On the thread: close the replay sockets of replaced sources, open the replays needed."""
        import zmq

        with self._lock:
            retired, self._retired = self._retired, []
            for sock in retired:
                self._replay_socks.pop(sock, None)
                try:
                    self._poller.unregister(sock)
                except KeyError:
                    pass
                sock.close(linger=0)
            if not open_new:
                return
            for src in self.sources.values():
                if src.replay_port is None:
                    continue
                for d in range(src.dp_size):
                    if d in src.sockets or d in src.replay_started:
                        continue
                    sock = self._ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(f"tcp://127.0.0.1:{src.replay_port + d}")
                    sock.send_multipart([b"", (0).to_bytes(8, "big")])  # everything from sequence 0
                    self._replay_socks[sock] = (src.topic, d)
                    src.sockets[d] = sock
                    src.pending[d] = []
                    src.replay_started[d] = time.monotonic()
                    self._poller.register(sock, zmq.POLLIN)
                    self.counters["replays"] += 1

    def _on_replay(self, sock) -> None:
        import zmq

        topic, d = self._replay_socks.get(sock, (None, 0))
        src = self.sources.get(topic)
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if src is None:
                continue
            frames = frames[1:] if frames and frames[0] == b"" else frames
            if len(frames) == 3 and int.from_bytes(frames[1], "big", signed=True) == END_SEQ:
                self._finish_replay(src, d)
                return
            got = self._batch(frames)
            if got is None:
                continue
            _, seq, events, _ = got
            name = src.rank_name(d)
            if self.index.rank(name).last_seq is None and seq > 0:
                self.index.mark_cold(name, f"the replay buffer starts at sequence {seq}: earlier events are gone")
            self._apply(src, d, seq, events, replay=True)

    def _finish_replay(self, src: _Source, d: int) -> None:
        name = src.rank_name(d)
        if self.index.rank(name).last_seq is None:
            self.index.mark_empty(name)  # nothing published yet: an empty cache, known exactly
        held = src.pending.pop(d, [])
        for seq, events in held:
            self._apply(src, d, seq, events)
        self._drop_replay_socket(src, d)
        src.replay_started[d] = -1  # done
        log.info("kv events: %s replayed (%s)", name, "warm" if self.index.rank(name).warm
                 else self.index.rank(name).cold)

    def _expire_replays(self) -> None:
        now = time.monotonic()
        for src in list(self.sources.values()):
            for d, t0 in list(src.replay_started.items()):
                if t0 >= 0 and src.pending.get(d) and now - t0 > REPLAY_WAIT_S:
                    name = src.rank_name(d)
                    log.warning("kv events: %s did not answer its replay in %.0f s; applying live events (cold)",
                                name, REPLAY_WAIT_S)
                    self.index.mark_cold(name, "its replay endpoint did not answer")
                    held = src.pending.pop(d, [])
                    for seq, events in held:
                        self._apply(src, d, seq, events, replay=True)
                    self._drop_replay_socket(src, d)
                    src.replay_started[d] = -1

    def _drop_replay_socket(self, src: _Source, d: int) -> None:
        sock = src.sockets.pop(d, None)
        if sock is not None:
            with self._lock:
                self._retired.append(sock)

    def snapshot(self) -> dict:
        """Counters, and per rank what the index holds (see :meth:`KVIndex.snapshot`)."""
        return {"counters": dict(self.counters), "ranks": self.index.snapshot()}
