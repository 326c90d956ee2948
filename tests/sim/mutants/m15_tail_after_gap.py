# A tail counts only when no chunk beyond a gap is stored (a crash that left chunk N+1 stored
# and chunk N not, mid-PATCH, then reports the upload below the offset its tail acknowledged).
import pathlib
p = pathlib.Path("storage/upload_layout.py"); s = p.read_text()
old = "        fits = not final and tail is None and index_of(info.key) == len(good)"
assert s.count(old) == 1
p.write_text(s.replace(old, "        fits = not (broken or final) and tail is None and index_of(info.key) == len(good)"))
