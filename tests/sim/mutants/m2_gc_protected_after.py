# Fix 2 reverted: gc asks which versions are protected only after it read the manifests.
import pathlib
p = pathlib.Path("storage/gc.py"); s = p.read_text()
old = '''    protected = await _protected(backend, hook, now)
    seen = await _read_records(backend, report)
    protected |= await _protected(backend, hook, now)'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''    seen = await _read_records(backend, report)
    protected = await _protected(backend, hook, now)'''))
