# Fix 7 reverted: a waiter judges a lease's expiry by its own wall clock with no margin for skew.
import pathlib
p = pathlib.Path("storage/leases.py"); s = p.read_text()
old = '''        self.max_clock_skew = self.stale_after if max_clock_skew is None else float(max_clock_skew)'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''        self.max_clock_skew = 0.0'''))
