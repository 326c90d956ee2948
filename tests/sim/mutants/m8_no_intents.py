# Without write intents: gc protects a PUT's chunks by their age alone.
import pathlib
p = pathlib.Path("storage/gc.py"); s = p.read_text()
old = '''    for intent in await intents.scan(backend):
        if intent.key and intent.expires > now:'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''    for intent in []:
        if intent.key and intent.expires > now:'''))
