# A refused conditional write is taken as lost without reading back (a retried write refused by
# its own first attempt is then reported failed although it landed).
import pathlib
p = pathlib.Path("storage/manifests.py"); s = p.read_text()
old = '''        except PreconditionFailed:
            return await self._read_back(key, rev, None, lost=True)'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''        except PreconditionFailed:
            return CommitResult(Outcome.LOST, await self.read(key))'''))
