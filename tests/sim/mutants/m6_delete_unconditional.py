# Fix 6 reverted: DELETE checks its lease, then removes the record unconditionally.
import pathlib
p = pathlib.Path("storage/objects.py"); s = p.read_text()
old = '''            result = await self.commit_record(key, None, current, lease, attempt, events=announce)
            if result.outcome is Outcome.COMMITTED:
                return  # the tombstone stays until gc (storage.manifests explains why)'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''            lease.check()
            await self.backend.delete(keys.manifest_key(key))
            self._forget_manifest(key)
            self._delete_version_later(current.manifest)
            return'''))
