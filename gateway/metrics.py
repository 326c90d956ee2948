"""The Prometheus adapter: the one place that knows about prometheus_client.

Domain code keeps plain counters (``ObjectStore.stats``, ``ChunkCache.stats``, ``LockManager``
statistics, upload statistics); a custom collector reads them at scrape time, so lock ages are
computed from live state when Prometheus asks. Latencies are histograms fed by callbacks.
Each app has its own registry, so several gateways in one test process don't collide.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.gc_collector import GCCollector

# From 1 ms (a cache hit) to 10 minutes (a multi-gigabyte upload): the default buckets stop at
# 10 s, which would put every large transfer into +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOCK_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

BACKEND_OPS = ("put", "get", "head", "delete", "list")
BACKEND_OUTCOMES = ("ok", "not_found", "precondition_failed", "transient", "permanent")
GC_KINDS = ("chunk", "upload", "lease")
MEDIA_KINDS = ("playlist", "segment", "media", "other")  # gateway.caching.media_kind
# Methods kept as their own label value; any other (aiohttp's pure-Python parser accepts made-up
# tokens such as "FOO1", "FOO2", ...) is "other", so a client cannot grow the label set at will.
HTTP_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})

METRIC_NAMES = frozenset(
    """
    chunkgate_http_requests_total chunkgate_http_request_duration_seconds chunkgate_http_response_bytes_total
    chunkgate_http_request_bytes_total chunkgate_http_requests_in_flight
    chunkgate_backend_requests_total chunkgate_backend_request_duration_seconds chunkgate_backend_bytes_read_total
    chunkgate_backend_bytes_written_total chunkgate_backend_queue_depth
    chunkgate_cache_hits_total chunkgate_cache_misses_total chunkgate_cache_coalesced_total
    chunkgate_cache_evictions_total chunkgate_cache_bytes chunkgate_cache_readahead_total
    chunkgate_locks_active chunkgate_locks_waiting chunkgate_lock_oldest_age_seconds chunkgate_lock_acquisitions_total
    chunkgate_lock_wait_seconds chunkgate_lock_timeouts_total chunkgate_lock_stale_cleared_total
    chunkgate_lock_release_requests_total chunkgate_lock_lease_conflicts_total chunkgate_lock_takeovers_total
    chunkgate_chunk_size_mismatch_total chunkgate_chunk_checksum_mismatch_total chunkgate_manifest_repairs_total
    chunkgate_objects_committed_total chunkgate_commit_conflicts_total
    chunkgate_uploads_created_total chunkgate_uploads_completed_total chunkgate_uploads_aborted_total
    chunkgate_uploads_expired_total chunkgate_uploads_in_progress chunkgate_upload_bytes_total
    chunkgate_gc_runs_total chunkgate_gc_deleted_total
    chunkgate_hook_deliveries_total chunkgate_hook_outbox_oldest_age_seconds chunkgate_hook_outbox_pending
    chunkgate_object_reads_total
    """.split()
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.http_requests = Counter("chunkgate_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("chunkgate_http_request_duration_seconds", "HTTP request duration, to the last byte",
                                       ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_response_bytes = Counter("chunkgate_http_response_bytes", "Body bytes sent", ["route"], registry=r)
        self.http_request_bytes = Counter("chunkgate_http_request_bytes", "Body bytes received", ["route"], registry=r)
        self.http_in_flight = Gauge("chunkgate_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.backend_requests = Counter("chunkgate_backend_requests", "Store requests", ["op", "outcome"], registry=r)
        self.backend_duration = Histogram("chunkgate_backend_request_duration_seconds", "Store request duration", ["op"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.backend_read = Counter("chunkgate_backend_bytes_read", "Bytes read from the store", registry=r)
        self.backend_written = Counter("chunkgate_backend_bytes_written", "Bytes written to the store", registry=r)
        self.lock_wait = Histogram("chunkgate_lock_wait_seconds", "Time from asking for a lock to holding it",
                                   buckets=LOCK_WAIT_BUCKETS, registry=r)
        self.gc_runs = Counter("chunkgate_gc_runs", "Garbage collection sweeps finished", registry=r)
        self.gc_deleted = Counter("chunkgate_gc_deleted", "Items garbage collection deleted", ["kind"], registry=r)
        self.object_reads = Counter("chunkgate_object_reads", "GET requests answered for an object, by media kind "
                                    "(playlist, segment, media, other)", ["kind"], registry=r)
        # Pre-create the label sets dashboards and alerts query, so they exist (at 0) from the
        # start: a panel selecting outcome=~"transient|permanent" must show 0, not "No data",
        # on a healthy gateway (found evaluating every panel on a real Prometheus).
        for op in BACKEND_OPS:
            for outcome in BACKEND_OUTCOMES:
                self.backend_requests.labels(op, outcome)
            self.backend_duration.labels(op)
        for kind in GC_KINDS:
            self.gc_deleted.labels(kind)
        for kind in MEDIA_KINDS:
            self.object_reads.labels(kind)
        self._sources: list[Callable[[], Iterable[Any]]] = []
        r.register(_DomainCollector(self._sources))

    # BackendObserver
    def backend_call(self, op: str, outcome: str, seconds: float, bytes_read: int, bytes_written: int) -> None:
        self.backend_requests.labels(op, outcome).inc()
        self.backend_duration.labels(op).observe(seconds)
        if bytes_read:
            self.backend_read.inc(bytes_read)
        if bytes_written:
            self.backend_written.inc(bytes_written)

    def object_read(self, kind: str) -> None:
        self.object_reads.labels(kind).inc()

    def lock_waited(self, seconds: float) -> None:
        self.lock_wait.observe(seconds)

    def gc_ran(self, *, chunks: int = 0, uploads: int = 0, leases: int = 0) -> None:
        """One finished gc sweep (``storage.gc.collect``'s report: chunks_deleted, uploads_expired)."""
        self.gc_runs.inc()
        for kind, n in (("chunk", chunks), ("upload", uploads), ("lease", leases)):
            if n:
                self.gc_deleted.labels(kind).inc(n)

    def add_source(self, source: Callable[[], Iterable[Any]]) -> None:
        """A callable yielding metric families, read at every scrape."""
        self._sources.append(source)

    def attach_store(self, store: Any, locks: Any) -> None:
        self.add_source(lambda: _store_families(store))
        self.add_source(lambda: _lock_families(locks))

    def attach_uploads(self, sessions: Any) -> None:
        self.add_source(lambda: _upload_families(sessions))

    def attach_hooks(self, hooks: Any, outbox: Any = None) -> None:
        """``hooks``: a ``gateway.hooks.HookClient`` (its delivery counters), or None; ``outbox``: the
        ``storage.outbox`` processor, whose oldest pending event's age is read at scrape time."""
        self.add_source(lambda: _hook_families(hooks, outbox))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def request_done(self, request: web.Request, status: int, seconds: float) -> None:
        """Record one answered request (called by the gateway's one observation middleware)."""
        route = _route_of(request)
        method = request.method if request.method in HTTP_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)
        sent = request.get("chunkgate.bytes_sent", 0)
        if sent:
            self.http_response_bytes.labels(route).inc(sent)
        received = request.get("chunkgate.bytes_received", 0)
        if received:
            self.http_request_bytes.labels(route).inc(received)


def _route_of(request: web.Request) -> str:
    """The route template, so labels stay bounded whatever keys clients use."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    if canonical and not canonical.startswith("/{path"):
        return "/objects/{key}" if canonical.startswith("/objects/") else canonical
    if request.path.startswith("/objects/"):
        return "/objects/{key}"
    return "other"


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    fam.add_metric(list(labels.values()) if labels else [], value)
    return fam


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _store_families(store: Any) -> Iterable[Any]:
    s = store.stats
    c = store.cache_stats
    size = CounterMetricFamily("chunkgate_chunk_size_mismatch", "Chunks whose stored size or checksum disagreed with the manifest",
                               labels=["verdict"])
    size.add_metric(["tolerated"], s.size_tolerated)
    size.add_metric(["rejected"], s.size_rejected)
    yield size
    yield _counter("chunkgate_chunk_checksum_mismatch", "Chunks of the right size with the wrong SHA-256", s.checksum_mismatch)
    yield _counter("chunkgate_manifest_repairs", "Manifests re-recorded after tolerated size drift", s.manifest_repairs)
    yield _counter("chunkgate_objects_committed", "Manifests committed", s.objects_committed)
    yield _counter("chunkgate_commit_conflicts", "Conditional manifest writes lost to another writer", s.commit_conflicts)
    yield _counter("chunkgate_cache_hits", "Chunk reads served from memory", c.hits)
    yield _counter("chunkgate_cache_misses", "Chunk reads that started a store fetch", c.misses)
    yield _counter("chunkgate_cache_coalesced", "Chunk reads that joined a fetch already in flight", c.coalesced)
    yield _counter("chunkgate_cache_evictions", "Chunks evicted from memory", c.evictions)
    yield _counter("chunkgate_cache_readahead", "Chunks fetched ahead of a sequential read", c.readahead)
    yield _gauge("chunkgate_cache_bytes", "Bytes of chunks held in memory", c.bytes)
    # The limiter's waiters; 0 without a limiter (wrappers pass attribute reads down to it).
    yield _gauge("chunkgate_backend_queue_depth", "Store calls waiting for the limiter now",
                 store.queue_depth)


def _upload_families(sessions: Any) -> Iterable[Any]:
    st = sessions.stats
    yield _counter("chunkgate_uploads_created", "tus uploads created", st.created)
    yield _counter("chunkgate_uploads_completed", "tus uploads completed (object committed)", st.completed)
    yield _counter("chunkgate_uploads_aborted", "tus uploads terminated by the client", st.aborted)
    yield _counter("chunkgate_uploads_expired", "tus uploads expired without finishing", st.expired)
    yield _counter("chunkgate_upload_bytes", "Bytes received in tus PATCH bodies", st.bytes_received)
    yield _gauge("chunkgate_uploads_in_progress", "tus uploads started and not yet finished", sessions.in_progress)


def _lock_families(locks: Any) -> Iterable[Any]:
    st = locks.stats
    yield _gauge("chunkgate_locks_active", "Locks held now", locks.active())
    yield _gauge("chunkgate_locks_waiting", "Requests waiting for a lock now", locks.waiting())
    yield _gauge("chunkgate_lock_oldest_age_seconds", "Age of the oldest lock held now", locks.oldest_age())
    yield _counter("chunkgate_lock_acquisitions", "Locks granted", st.acquisitions)
    yield _counter("chunkgate_lock_timeouts", "Lock waits that timed out", st.timeouts)
    yield _counter("chunkgate_lock_stale_cleared", "Stale locks cleared for a waiter", st.stale_cleared)
    yield _counter("chunkgate_lock_release_requests", "Waiters that asked a holder to release", st.release_requests)
    yield _counter("chunkgate_lock_lease_conflicts", "Store lease writes that lost a race", getattr(st, "lease_conflicts", 0))
    yield _counter("chunkgate_lock_takeovers", "Expired store leases taken over", getattr(st, "takeovers", 0))


HOOK_TYPES = ("pre-create", "post-finish", "post-delete")
HOOK_OUTCOMES = ("ok", "refused", "error")


def _hook_families(hooks: Any, outbox: Any) -> Iterable[Any]:
    fam = CounterMetricFamily("chunkgate_hook_deliveries", "Hook requests by event type and outcome (ok = 2xx)",
                              labels=["type", "outcome"])
    counts = hooks.stats.deliveries if hooks is not None else {}
    for kind in HOOK_TYPES:  # every label set from the start: panels and alerts see 0, not "No data"
        for outcome in HOOK_OUTCOMES:
            fam.add_metric([kind, outcome], counts.get((kind, outcome), 0))
    yield fam
    yield _gauge("chunkgate_hook_outbox_oldest_age_seconds",
                 "Age of the oldest post-* event known to be undelivered (0 when none is)",
                 outbox.oldest_age() if outbox is not None else 0.0)
    yield _gauge("chunkgate_hook_outbox_pending", "post-* events known to be undelivered",
                 outbox.pending() if outbox is not None else 0)


class _DomainCollector:
    def __init__(self, sources: list[Callable[[], Iterable[Any]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Any]:
        for source in self._sources:
            yield from source()

    def describe(self) -> Iterable[Any]:
        return []  # dynamic: don't let registration call collect() before the sources exist


async def metrics_handler(request: web.Request) -> web.Response:
    metrics: Metrics = request.app["metrics"]
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
