# Lease records fix reverted: the lease sweep removes every record it finds, live holders' too.
import pathlib
p = pathlib.Path("storage/leases.py"); s = p.read_text()
old = '            if record.get("released") or expires + self.max_clock_skew <= now or mono - since > self.stale_after:\n'
assert s.count(old) == 1
p.write_text(s.replace(old, "            if True:\n"))
