# Fix 3 reverted: a commit whose outcome is unknown (cancelled, store failure) deletes its chunks.
import pathlib
p = pathlib.Path("storage/writes.py"); s = p.read_text()
old = '''        if attempt.in_doubt and not attempt.committed:'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''        if False:'''))
