"""The invariants the simulator checks, stated once (README: "Testing the commit protocol").

- **I1** every committed manifest's chunks exist with the recorded sizes and SHA-256s (a chunk
  the simulator itself drifted is exempt until repaired);
- **I2** an acknowledged write stays until a later write or delete of its key: no version becomes
  current twice (no resurrection); a write takes effect only while its request may still succeed
  (never after it was reported failed, never after its acknowledgement); a conditional write
  replaces only a state its condition allows; an acknowledgement means the write took effect
  (a tus upload may complete as superseded only when a later write replaced the version it was
  to replace while it was committing); only the commit protocol changes a record;
- **I3** every read returns exactly the bytes of one version that was committed during it
  (or up to the manifest cache's lifetime before it);
- **I4** once the workload stops and time passes grace and expiry, no unreferenced chunk, no
  upload record, no write intent, no tombstone, no held lease remains, no upload is stuck, and
  fsck is clean;
- **I5** no exception escapes but the typed errors the HTTP layer maps (never a 500);
- **I6** no two leases of one key are valid at once, whatever the gateways' clocks say;
- **I7** an upload's offset, as any request started after a PATCH's acknowledgement reports it,
  is never below the offset that PATCH acknowledged (bytes acknowledged are durable, whatever
  crashed since).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from storage import keys
from storage.manifest import Manifest
from storage.manifests import Current, identity

from tests.sim.world import Transition, World


class Violation(AssertionError):
    """An invariant does not hold."""


@dataclass
class UploadModel:
    key: str
    length: int
    data: bytes
    id: str = ""
    known_offset: int = 0
    acks: list[tuple[float, int, str]] = field(default_factory=list)  # (when, offset, by): PATCH answers
    terminated: bool = False
    final_state: str = ""


@dataclass
class OpRecord:
    id: int
    kind: str
    gateway: str
    key: str
    invoked: float
    responded: float | None = None
    outcome: str = ""  # ok | error | cancelled | crashed
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    cond: tuple[str, str | None] | None = None
    data: bytes = b""
    version: str | None = None
    read: tuple[Manifest, int, int, bytes] | None = None
    upload: UploadModel | None = None
    checksum_ok: bool = False
    acked_upload: bool = False
    sent: int = 0  # a PATCH: bytes of its body the gateway took
    first_byte_at: float = 0.0

    def __str__(self) -> str:
        return f"op {self.id} {self.kind} {self.key!r} on {self.gateway}"


def _maps_cleanly(exc: BaseException) -> int | None:
    """The HTTP status the gateway answers ``exc`` with (None: it would be a 500)."""
    from gateway.errors import to_response

    response = to_response(exc)
    return None if response is None or response.status == 500 else response.status


@dataclass
class Checker:
    world: World
    trace: list[str]
    drifted: set[str] = field(default_factory=set)
    _seen_transitions: int = 0
    ever_current: dict[str, set[str]] = field(default_factory=dict)
    ops: dict[int, OpRecord] = field(default_factory=dict)
    done: list[OpRecord] = field(default_factory=list)
    violation: str | None = None

    @property
    def now(self) -> float:
        return self.world.loop.time()

    def fail(self, message: str) -> None:
        self.trace.append(f"t={self.now:9.3f} VIOLATION {message}")
        if self.violation is None:
            self.violation = message
        raise Violation(message)

    def raise_if_failed(self) -> None:
        """A violation found inside an operation's task is raised again here, in the driver."""
        if self.violation is not None:
            raise Violation(self.violation)

    def saw_offset(self, upload: UploadModel, offset: int, rec: OpRecord, *, acked: bool, state: str = "") -> None:
        """I7: ``rec`` (started at ``rec.invoked``) reports ``offset`` for ``upload``; ``acked``:
        it is a PATCH's successful answer, which later requests must never report less than."""
        before = [(when, off, by) for when, off, by in upload.acks if when < rec.invoked and off > offset]
        if before:
            when, off, by = max(before, key=lambda a: a[1])
            self.fail(f"I7: {rec} reports upload {upload.id[:8]} at offset {offset} ({state}), "
                      f"but {by} acknowledged offset {off} at t={when:.3f}, before it started")
        if acked:
            upload.acks.append((self.now, offset, str(rec)))

    # ------------------------------------------------------------------------- per step
    def op_done(self, record: OpRecord) -> None:
        self.ops[record.id] = record
        self.done.append(record)
        what = record.outcome if record.error is None else f"{record.outcome} {type(record.error).__name__}: {record.error}"
        self.trace.append(f"t={self.now:9.3f}   {record} -> {what}")
        self._check_transitions()  # transitions before this answer are judged with it in view
        if record.outcome == "error":
            assert record.error is not None
            if isinstance(record.error, Violation):
                return  # found inside the operation (I7), and recorded there
            if _maps_cleanly(record.error) is None:
                self.fail(f"I5: {record} raised {type(record.error).__name__}: {record.error} (would be a 500)")
            if record.kind == "tus_patch" and record.checksum_ok and type(record.error).__name__ == "UploadChecksumMismatch":
                self.fail(f"I5: {record} sent a correct Upload-Checksum and was told its data is corrupt (460)")
        if record.outcome == "ok":
            self._check_ack(record)
            if record.read is not None:
                self._check_read(record)

    def step(self) -> None:
        self.raise_if_failed()
        self._check_transitions()
        self._check_chunks()
        self._check_leases()

    def _writer(self, t: Transition) -> OpRecord | None:
        return self.ops.get(t.op) if t.op is not None else None

    def _check_transitions(self) -> None:
        log = self.world.store.transitions
        while self._seen_transitions < len(log):
            t = log[self._seen_transitions]
            self._seen_transitions += 1
            self._check_transition(t)

    def _check_transition(self, t: Transition) -> None:
        before, after = _version(t.before), _version(t.after)
        self.trace.append(f"t={t.time:9.3f}   record {t.key!r}: {before} -> {after} "
                          f"({'tombstone' if t.after is not None and t.after.manifest is None else 'record'}"
                          f"{'' if t.after is not None else ' removed'}) by op {t.op}")
        if before == after:
            return  # a repair or an events update of the same version
        if t.after is None and t.before is not None and t.before.manifest is None:
            return  # a tombstone removed
        if after is not None:
            seen = self.ever_current.setdefault(t.key, set())
            if after in seen:
                self.fail(f"I2: version {after} of {t.key!r} became current a second time (resurrected) by op {t.op}")
            seen.add(after)
        op = self.ops.get(t.op) if t.op is not None else None
        self._check_deferred_upload_commit(t, op)
        writer = self._writer_op(t)
        if writer is not None and writer.responded is not None and t.time > writer.responded:
            if writer.outcome == "ok":
                self.fail(f"I2: {writer} took effect at t={t.time:.3f}, after it was acknowledged at {writer.responded:.3f}")
            if writer.outcome == "error" and not _outcome_unknown(writer.error):
                self.fail(f"I2: {writer} took effect at t={t.time:.3f} after it was reported failed: {writer.error}")
        cond_op = writer if writer is not None else op
        if cond_op is not None and cond_op.cond is not None and cond_op.kind in ("put", "delete"):
            kind, etag = cond_op.cond
            have = t.before.manifest.etag if t.before is not None and t.before.manifest is not None else None
            if kind == "if-none-match" and have is not None:
                self.fail(f"I2: {cond_op} (If-None-Match: *) replaced version {before} of {t.key!r}")
            if kind == "if-match" and have != etag:
                self.fail(f"I2: {cond_op} (If-Match: {etag}) replaced {t.key!r} in state {have} (version {before})")
        if op is not None and op.kind not in ("put", "delete", "get", "fsck", "tus_patch", "tus_head", "tus_create",
                                              "tus_terminate", "sweep"):
            self.fail(f"I2: {op} changed the record of {t.key!r} ({before} -> {after}): only commits may")

    def _check_deferred_upload_commit(self, t: Transition, op: OpRecord | None) -> None:
        """A tus upload committed by a request other than the one that sent its last bytes (a
        HEAD, the sweeper, a retry after that request failed) replaces only what the key held
        when those bytes were sent: never a write that came in between."""
        if t.after is None or t.after.manifest is None or not t.after.manifest.extra.get("upload"):
            return
        upload_id = t.after.manifest.extra["upload"]
        writes = [r for r in self.ops.values() if r.kind == "tus_patch" and r.upload is not None
                  and r.upload.id == upload_id and r.sent > 0 and r.first_byte_at <= t.time]
        # The last bytes are those of the request whose body was read last (a request holds the
        # upload's lease while its body is read, so this is the order the lease passed in; the
        # order requests were *sent* in is not: a request may wait for the lease behind a later one).
        last = max(writes, key=lambda r: r.first_byte_at) if writes else None
        if last is None or op is last:
            return
        # That request may itself have decided to commit over what it found then (recording
        # ``committing``): a later request only carries that decision out.
        decided = [w[0] for w in self.world.store.record_writes
                   if w[3] == last.id and w[1] == keys.UPLOAD_PREFIX + upload_id + "/info" and b'"state":"committing"' in w[2]]
        cutoff = max([last.first_byte_at, *decided])
        between = [x for x in self.world.store.transitions
                   if x.key == t.key and cutoff < x.time < t.time and _version(x.before) != _version(x.after)
                   and not (x.after is not None and x.after.manifest is not None
                            and x.after.manifest.extra.get("upload") == upload_id)]
        if between:
            self.fail(f"I2: upload {upload_id} was committed at t={t.time:.3f} by {op}, over "
                      f"{_version(t.before)} written at t={between[-1].time:.3f}, after its last bytes were sent "
                      f"(op {last.id} from t={last.first_byte_at:.3f}, decided by {cutoff:.3f})")

    def _writer_op(self, t: Transition) -> OpRecord | None:
        """The write operation whose version this transition commits (a PUT), or whose delete
        it is; None for a tus upload's commit (judged by its upload)."""
        if t.after is not None and t.after.manifest is not None:
            if t.after.manifest.extra.get("upload"):
                return None
            op_id = self.world.store.intent_ops.get(t.after.manifest.version)
            return self.ops.get(op_id) if op_id is not None else None
        op = self.ops.get(t.op) if t.op is not None else None
        return op if op is not None and op.kind == "delete" else None

    # ------------------------------------------------------------------------- acknowledgements
    def _check_ack(self, rec: OpRecord) -> None:
        log = self.world.store.transitions
        if rec.kind == "put":
            if not any(t.key == rec.key and _version(t.after) == rec.version and t.time <= rec.responded for t in log):
                self.fail(f"I2: {rec} was acknowledged (version {rec.version}) but never committed")
        elif rec.kind == "delete":
            if not any(t.key == rec.key and t.op == rec.id and _version(t.before) is not None and _version(t.after) is None
                       for t in log):
                self.fail(f"I2: {rec} was acknowledged but nothing was deleted by it")
        elif rec.acked_upload and rec.upload is not None:
            self._check_upload_ack(rec)

    def _check_upload_ack(self, rec: OpRecord) -> None:
        upload = rec.upload
        assert upload is not None
        record = _upload_record(self.world, upload.id)
        if record is None:
            return  # terminated and swept: nothing to say
        version = record["version"]
        log = self.world.store.transitions
        if any(t.key == upload.key and _version(t.after) == version and t.time <= rec.responded for t in log):
            return
        if not record.get("superseded"):
            self.fail(f"I2: upload {upload.id} was reported complete ({rec}) but its version {version} never committed")
        # Since the request that recorded what the upload replaces began (it read the key then;
        # its record saying so may land much later, delayed on the wire).
        was = record.get("replaces")
        recorded = [self.ops[w[3]].invoked if w[3] in self.ops else w[0] for w in self.world.store.record_writes
                    if w[1] == keys.UPLOAD_PREFIX + upload.id + "/info" and json.loads(w[2]).get("replaces") == was
                    and json.loads(w[2]).get("replaces_known")]
        since = min(recorded) if recorded else 0.0
        replaced = [t for t in log if t.key == upload.key and t.time >= since and identity(t.before) == was
                    and identity(t.after) != was]
        if not replaced:
            self.fail(f"I2: upload {upload.id} completed as superseded, yet the version it was to replace "
                      f"({record.get('replaces')}) was never replaced after it began committing")

    # ------------------------------------------------------------------------- reads
    def _check_read(self, rec: OpRecord) -> None:
        assert rec.read is not None and rec.responded is not None
        manifest, start, end, data = rec.read
        ttl = self.world.settings.manifest_ttl
        committed = self._current_intervals(rec.key, manifest.version)
        if not any(lo <= rec.responded and (hi is None or hi >= rec.invoked - ttl) for lo, hi in committed):
            self.fail(f"I3: {rec} read version {manifest.version}, which was not current during the read ({committed})")
        expected = b""
        for ref in manifest.chunks_for(start, end):
            ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
            matches = [c for c in self.world.store.chunk_history.get(ck, []) if hashlib.sha256(c).hexdigest() == ref.sha256]
            if not matches:
                self.fail(f"I3: {rec} returned bytes for chunk {ref.index}, whose recorded SHA-256 no stored bytes had")
            lo = max(start, ref.offset) - ref.offset
            hi = min(end, ref.end) - ref.offset
            expected += matches[0][lo:hi]
        if data != expected:
            self.fail(f"I3: {rec} returned {len(data)} bytes that are not bytes [{start}, {end}) of version {manifest.version}")

    def _current_intervals(self, key: str, version: str) -> list[tuple[float, float | None]]:
        intervals: list[tuple[float, float | None]] = []
        start: float | None = None
        for t in self.world.store.transitions:
            if t.key != key:
                continue
            if _version(t.after) == version and _version(t.before) != version:
                start = t.time
            elif start is not None and _version(t.after) != version:
                intervals.append((start, t.time))
                start = None
        if start is not None:
            intervals.append((start, None))
        return intervals

    # ------------------------------------------------------------------------- state
    def _check_chunks(self) -> None:
        mem = self.world.store.mem
        for store_key in list(mem._entries):
            if not store_key.startswith(keys.MANIFEST_PREFIX):
                continue
            current = self.world.store.peek(keys.object_key_of_manifest(store_key))
            if current is None or current.manifest is None:
                continue
            m = current.manifest
            for ref in m.chunks:
                ck = keys.chunk_key(m.key, m.version, ref.index)
                entry = mem._entries.get(ck)
                if entry is None:
                    by = [(round(t, 3), op) for t, k, op in self.world.store.chunk_deletes if k == ck]
                    self.fail(f"I1: chunk {ref.index} of the committed version {m.version} of {m.key!r} is missing "
                              f"(deleted at {by}: time, op)")
                if ck in self.drifted:
                    continue
                if len(entry.data) != ref.size or hashlib.sha256(entry.data).hexdigest() != ref.sha256:
                    self.fail(f"I1: chunk {ref.index} of {m.key!r} version {m.version} does not match its manifest")

    def _check_leases(self) -> None:
        held: dict[str, list[Any]] = {}
        for lease in self.world.live_leases():
            held.setdefault(lease.key, []).append(lease)
        for key, leases in held.items():
            if len(leases) > 1:
                owners = ", ".join(f"{lease.owner} (token {lease.token})" for lease in leases)
                self.fail(f"I6: {len(leases)} valid leases of {key!r} at once: {owners}")

    def final(self, fsck_report: Any, uploads: list[UploadModel]) -> None:
        mem = self.world.store.mem
        referenced: set[str] = set()
        for store_key in list(mem._entries):
            if store_key.startswith(keys.MANIFEST_PREFIX):
                current = self.world.store.peek(keys.object_key_of_manifest(store_key))
                if current is None or current.manifest is None:
                    self.fail(f"I4: a tombstone of {store_key!r} is left")
                m = current.manifest
                referenced |= {keys.chunk_key(m.key, m.version, r.index) for r in m.chunks}
        left = {
            "unreferenced chunks": [k for k in mem._entries if k.startswith(keys.CHUNK_PREFIX) and k not in referenced],
            "upload records or tails": [k for k in mem._entries if k.startswith(keys.UPLOAD_PREFIX)],
            "write intents": [k for k in mem._entries if k.startswith(keys.INTENT_PREFIX)],
            # Released leases are deleted (If-Match), crashed holders' records swept once stale.
            "lease records": [k for k in mem._entries if k.startswith(keys.LEASE_PREFIX)],
            "probe keys": [k for k in mem._entries if k.startswith("p/")],
        }
        for what, found in left.items():
            if found:
                self.fail(f"I4: after quiescence {len(found)} {what} remain: {sorted(found)[:5]}")
        stuck = [u for u in uploads if u.id and u.final_state.startswith("error")]
        if stuck:
            self.fail(f"I4: uploads stuck: {[(u.id, u.final_state) for u in stuck]}")
        damaged = [o.line() for o in fsck_report.damaged]
        if damaged:
            self.fail(f"I4: fsck after quiescence: {damaged}")


def _version(current: Current | None) -> str | None:
    return current.version if current is not None else None


def _outcome_unknown(exc: BaseException | None) -> bool:
    return bool(getattr(exc, "outcome_unknown", False))


def _upload_record(world: World, upload_id: str) -> dict[str, Any] | None:
    entry = world.store.mem._entries.get(keys.UPLOAD_PREFIX + upload_id + "/info")
    return None if entry is None else json.loads(entry.data)
