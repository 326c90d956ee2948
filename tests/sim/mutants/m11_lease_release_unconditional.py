# Lease records fix reverted: a released lease's record is deleted unconditionally (not If-Match its ETag).
import pathlib
p = pathlib.Path("storage/leases.py"); s = p.read_text()
old = "            await self.backend.delete(keys.lease_key(key), if_match=etag)\n"
assert s.count(old) == 1
p.write_text(s.replace(old, "            await self.backend.delete(keys.lease_key(key))\n"))
