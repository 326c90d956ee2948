# Lease records fix reverted: released leases are only marked released, and nothing sweeps them.
import pathlib
p = pathlib.Path("storage/leases.py"); s = p.read_text()
old = "        self.conditional_deletes = True\n"
assert s.count(old) == 1
p.write_text(s.replace(old, "        self.conditional_deletes = False\n"))
