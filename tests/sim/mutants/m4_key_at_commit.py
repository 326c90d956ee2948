# Fix 4 reverted: tus creation checks only the API key rules; the store's limit is met at commit,
# where the upload then stays committing.
import pathlib
p = pathlib.Path("storage/uploads.py"); s = p.read_text()
old = '''        self.store.manifests.check_key(key)
        if length is not None and length > self.options.max_size:'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''        keys.validate_key(key)
        if length is not None and length > self.options.max_size:'''))
p = pathlib.Path("storage/upload_commit.py"); s = p.read_text()
old = '''        except BadKey as exc:
            # The store cannot hold the key (refused outright, nothing landed): the upload can
            # never complete, so it ends here instead of pinning its chunks forever.
            log.error("upload %s cannot be committed and is aborted: %s", record.id, exc)
            await self._abort(durable, lease, f"could not be committed: {exc}")
            raise'''
assert s.count(old) == 1
p.write_text(s.replace(old, '''        except BadKey as exc:
            raise StoreFailed(str(exc)) from exc'''))
