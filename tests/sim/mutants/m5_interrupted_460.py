# Fix 5 reverted: a PATCH stopped by a release request ends its body normally, and its checksum is
# then judged over the part it read.
import pathlib
p = pathlib.Path("storage/errors.py"); s = p.read_text()
start = s.index("class BodyInterrupted(Exception):")
end = s.index("class UploadTooLarge(BodyTooLarge):")
p.write_text(s[:start] + s[end:])
p = pathlib.Path("storage/uploads.py"); s = p.read_text()
for name in ("    BodyInterrupted,\n", '    "BodyInterrupted",\n'):
    assert s.count(name) == 1, name
    s = s.replace(name, "")
old = s[s.index("        if isinstance(error, BodyInterrupted):"):s.index("        if hasher is not None:\n            if error is None and checksum")]
s = s.replace(old, "")
p.write_text(s)
p = pathlib.Path("gateway/tus.py"); s = p.read_text()
s = s.replace("    BodyInterrupted,\n", "").replace('raise BodyInterrupted("another request asked for the upload")', "return")
p.write_text(s)
