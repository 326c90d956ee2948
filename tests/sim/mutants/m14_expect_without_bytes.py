# A PATCH records what the key holds before its first byte arrives: one stopped before its body moves the expectation past a PUT while an earlier PATCH's delayed bytes still complete the upload.
import pathlib
p = pathlib.Path("storage/uploads.py"); s = p.read_text()
old = '''        return Appender(self, durable, lease, tail_bytes, expected=await self.holds_now(durable))
'''
new = '''        expected = await self.holds_now(durable)
        await self.expect(durable, lease, expected)
        return Appender(self, durable, lease, tail_bytes, expected=expected)
'''
assert s.count(old) == 1
p.write_text(s.replace(old, new))
