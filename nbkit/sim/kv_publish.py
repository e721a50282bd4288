"""vLLM's KV-cache events out of a live simulated replica (:mod:`nbkit.sim.server`): the same
``--kv-events-config`` and the same wire format as vLLM 0.32's ``ZmqEventPublisher``
(``vllm/distributed/kv_events.py``), so the router's subscriber and the ``kv_aware`` policy read a
simulated replica exactly as a real one::

    cfg = parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "zmq", '
                                 '"endpoint": "tcp://127.0.0.1:5557", "topic": "replica0", '
                                 '"replay_endpoint": "tcp://127.0.0.1:5600"}')
    pub = KVEventPublisher(cfg, data_parallel_rank=0)      # PUB connects; ROUTER binds 127.0.0.1:5600
    pub.publish([{"type": "BlockStored", "block_hashes": [h], "parent_block_hash": None,
                  "token_ids": ids[:16], "block_size": 16, "lora_name": None, "medium": "GPU"}])
    pub.shutdown()

Each batch is three frames: the topic, an 8-byte big-endian sequence number (from 0, per DP rank)
and the msgpack of ``[ts, [event, ...], data_parallel_rank]``; an event is a map tagged ``"type"``
with vLLM's fields (fields at their default left out, as msgspec's ``omit_defaults`` does), block
hashes as unsigned 64-bit ints (vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), one
``BlockRemoved`` per evicted block. The replay endpoint (a ROUTER socket) answers ``[id, "",
start_seq]`` with every buffered batch from that sequence on, then ``[id, "", "", -1, ""]``.
DP rank ``r`` publishes to the endpoint's port + ``r`` and binds its replay endpoint on port + ``r``.

vLLM's own publisher is not imported: ``vllm.distributed.kv_events`` pulls in torch (about 20 s
and 0.5 GB per process here); this module needs pyzmq and msgspec only, loaded when a replica
publishes. The simulator binds loopback only: ``tcp://*:P`` (which vLLM binds on every interface)
binds 127.0.0.1:P here, and a replay endpoint on another host is refused.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import deque
from itertools import count
from typing import Any

__all__ = ["parse_kv_events_config", "KVEventPublisher", "offset_endpoint_port", "encode_events"]

#: The fields of vLLM's ``KVEventsConfig`` (and their defaults).
DEFAULTS: dict[str, Any] = {"enable_kv_cache_events": False, "publisher": None, "endpoint": "tcp://*:5557",
                            "replay_endpoint": None, "buffer_steps": 10_000, "hwm": 100_000,
                            "max_queue_size": 100_000, "topic": ""}
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_MASK64 = (1 << 64) - 1
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def parse_kv_events_config(text: str | dict | None) -> dict | None:
    """vLLM's ``--kv-events-config`` (JSON) as a dict of its fields, or None when nothing is to be
    published (absent, ``enable_kv_cache_events`` false, or publisher ``null``). Raises ValueError
    for what vLLM would refuse (bad JSON, an unknown publisher) or the simulator will not do."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            given = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--kv-events-config: not valid JSON: {e}") from None
    else:
        given = dict(text)
    if not isinstance(given, dict):
        raise ValueError("--kv-events-config: must be a JSON object")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"--kv-events-config: unknown field(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    cfg = {**DEFAULTS, **given}
    if cfg["publisher"] is None:
        cfg["publisher"] = "zmq" if cfg["enable_kv_cache_events"] else "null"
    if cfg["publisher"] not in ("zmq", "null"):
        raise ValueError(f"--kv-events-config: unknown event publisher {cfg['publisher']!r} (zmq or null)")
    if not cfg["enable_kv_cache_events"] or cfg["publisher"] == "null":
        return None
    for k in ("buffer_steps", "hwm", "max_queue_size"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ValueError(f"--kv-events-config: {k}={cfg[k]!r} must be a positive integer")
    if not isinstance(cfg["topic"], str):
        raise ValueError(f"--kv-events-config: topic={cfg['topic']!r} must be a string")
    _check_endpoint(cfg["endpoint"], "endpoint")
    if cfg["replay_endpoint"] is not None:
        _check_endpoint(cfg["replay_endpoint"], "replay_endpoint")
        if cfg["replay_endpoint"].startswith("tcp://") and _host(cfg["replay_endpoint"]) not in (
                *_LOOPBACK, "*", "0.0.0.0", "[::]", "::"):
            raise ValueError(f"--kv-events-config: replay_endpoint={cfg['replay_endpoint']!r}: the simulator "
                             "binds loopback only (use tcp://127.0.0.1:PORT)")
    return cfg


def _check_endpoint(ep: Any, name: str) -> None:
    if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"--kv-events-config: {name}={ep!r}: must be tcp://, ipc:// or inproc://")


def _host(ep: str) -> str:
    return ep[len("tcp://"):].rpartition(":")[0]


def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
    """vLLM's rule: DP rank ``r`` uses the endpoint's TCP port + ``r`` (``inproc``: a ``_dp<r>``
    suffix; port 0 is left to the OS).

    >>> offset_endpoint_port("tcp://127.0.0.1:5557", 2)
    'tcp://127.0.0.1:5559'
    """
    if not endpoint or data_parallel_rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{data_parallel_rank}"
    if "tcp" in endpoint and ":" in endpoint:
        base, _, port = endpoint.rpartition(":")
        return endpoint if int(port) == 0 else f"{base}:{int(port) + data_parallel_rank}"
    return endpoint


def _is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcard and ipc/inproc endpoints are bound; the others connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _loopback(endpoint: str) -> str:
    """A TCP endpoint to bind, on 127.0.0.1 whatever host it names (port 0: any free port)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    port = endpoint.rpartition(":")[2]
    return f"tcp://127.0.0.1:{'*' if port in ('0', '*') else port}"


# -------------------------------------------------------------------------------- encoding
_TYPES = None


def _types():
    """msgspec structs laid out as vLLM's (``EventBatch``, ``BlockStored``, ``BlockRemoved``,
    ``AllBlocksCleared``): the same field order, tags and omitted defaults, so the bytes match."""
    global _TYPES
    if _TYPES is None:
        import msgspec

        class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
            ts: float
            events: list
            data_parallel_rank: int | None = None

        class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
            pass

        class BlockStored(KVCacheEvent):
            block_hashes: list
            parent_block_hash: int | None
            token_ids: list
            block_size: int
            lora_id: int | None
            medium: str | None
            lora_name: str | None
            extra_keys: list | None = None
            group_idx: int | None = None
            kv_cache_spec_kind: str | None = None
            kv_cache_spec_sliding_window: int | None = None
            locality: str | None = None
            ownership: str | None = None
            session_id: str | None = None

        class BlockRemoved(KVCacheEvent):
            block_hashes: list
            medium: str | None
            group_idx: int | None = None
            locality: str | None = None
            ownership: str | None = None

        class AllBlocksCleared(KVCacheEvent):
            pass

        _TYPES = (EventBatch, BlockStored, BlockRemoved, AllBlocksCleared, msgspec.msgpack.Encoder())
    return _TYPES


def _u64(h):
    return None if h is None else h & _MASK64 if isinstance(h, int) else h


def _structs(events: list[dict]) -> list:
    """The engine's event maps (:attr:`nbkit.sim.engine.Engine.kv_events`) as vLLM 0.32 makes them:
    one KV-cache group (``group_idx`` 0, full attention), one ``BlockRemoved`` per block."""
    _, Stored, Removed, Cleared, _ = _types()
    out = []
    for ev in events:
        kind = ev.get("type")
        if kind == "BlockStored":
            out.append(Stored(block_hashes=[_u64(h) for h in ev["block_hashes"]],
                              parent_block_hash=_u64(ev.get("parent_block_hash")),
                              token_ids=list(ev.get("token_ids") or []), block_size=int(ev["block_size"]),
                              lora_id=ev.get("lora_id"), medium=ev.get("medium", "GPU"),
                              lora_name=ev.get("lora_name"), group_idx=0, kv_cache_spec_kind="full_attention"))
        elif kind == "BlockRemoved":
            out.extend(Removed(block_hashes=[_u64(h)], medium=ev.get("medium", "GPU"), group_idx=0)
                       for h in ev["block_hashes"])
        elif kind == "AllBlocksCleared":
            out.append(Cleared())
        else:
            raise ValueError(f"unknown KV-cache event type {kind!r}")
    return out


def encode_events(events: list[dict], data_parallel_rank: int = 0, ts: float | None = None) -> bytes:
    """The msgpack payload of one batch of the engine's events, as vLLM encodes a ``KVEventBatch``."""
    Batch, *_, enc = _types()
    return enc.encode(Batch(ts=time.time() if ts is None else ts, events=_structs(events),
                            data_parallel_rank=data_parallel_rank))


# ------------------------------------------------------------------------------- publisher
class KVEventPublisher:
    """One DP rank's PUB socket (and replay ROUTER), served by a daemon thread, as vLLM's
    ``ZmqEventPublisher``: :meth:`publish` queues a batch; the thread numbers it (from 0), sends it
    and keeps the last ``buffer_steps`` batches for replays."""

    def __init__(self, cfg: dict, data_parallel_rank: int = 0):
        import zmq

        self.cfg = cfg
        self.dp_rank = data_parallel_rank
        self.endpoint = offset_endpoint_port(cfg["endpoint"], data_parallel_rank)
        self.replay_endpoint = offset_endpoint_port(cfg["replay_endpoint"], data_parallel_rank)
        self.topic = cfg["topic"].encode("utf-8")
        self._queue: queue.Queue = queue.Queue(maxsize=cfg["max_queue_size"])
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg["buffer_steps"])
        self._seq = count()
        self.published = 0
        self.dropped = 0
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(cfg["hwm"])
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay = None
        try:
            if _is_bind_endpoint(self.endpoint):
                self._pub.bind(_loopback(self.endpoint))
                self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(_loopback(self.replay_endpoint))
                self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ValueError(f"--kv-events-config: DP rank {data_parallel_rank}: cannot bind or connect "
                             f"({self.endpoint}, replay {self.replay_endpoint}): {e}") from None
        self._running = True
        self._thread = threading.Thread(target=self._run, name=f"nbkit-sim-kv-publisher-{data_parallel_rank}",
                                        daemon=True)
        self._thread.start()

    def publish(self, events: list[dict], ts: float | None = None) -> None:
        """Queue one batch of the engine's event maps (one engine step's, as vLLM publishes)."""
        if not events:
            return
        if not self._running:
            raise RuntimeError("publisher is closed")
        try:
            self._queue.put_nowait((time.time() if ts is None else ts, list(events)))
        except queue.Full:  # vLLM's put() would block the engine; a simulated one counts the loss instead
            self.dropped += 1

    def _run(self) -> None:
        import zmq

        pub, replay = self._pub, self._replay
        poller = zmq.Poller()
        if replay is not None:
            poller.register(replay, zmq.POLLIN)
        while True:
            if replay is not None and poller.poll(0):
                try:
                    self._service_replay()
                except Exception as e:  # noqa: BLE001 - a bad request must not stop publishing
                    print(f"nbkit.sim.server: kv events: replay failed: {e!r}", file=sys.stderr, flush=True)
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                if not self._running:
                    break
                continue
            if item is None:
                break
            ts, events = item
            try:
                seq = next(self._seq)
                payload = encode_events(events, self.dp_rank, ts)
                pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
                self.published += 1
            except Exception as e:  # noqa: BLE001
                print(f"nbkit.sim.server: kv events: publishing failed: {e!r}", file=sys.stderr, flush=True)
                time.sleep(0.1)
        self._close_sockets()

    def _service_replay(self) -> None:
        frame = self._replay.recv_multipart()
        if len(frame) != 3:
            return
        client, _, start = frame
        start_seq = int.from_bytes(start, "big")
        for seq, buf in list(self._buffer):
            if seq >= start_seq:
                self._replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), buf))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def shutdown(self, timeout: float = 1.0) -> None:
        """Send what is queued (up to ``timeout``), then close the sockets."""
        if not self._running:
            return
        self._running = False
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout + 1.0)
