// Uploads one file to a chunkgate gateway with tus-js-client (Node), the way a browser app would.
// usage: node upload.mjs ENDPOINT FILE KEY [CHUNK_SIZE]
// Prints one JSON line: {"ok": true, "url": ..., "bytes": N} or {"ok": false, "error": ...}.
import fs from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, file, key, chunkSize] = process.argv.slice(2);
if (!endpoint || !file || !key) {
  console.error("usage: node upload.mjs ENDPOINT FILE KEY [CHUNK_SIZE]");
  process.exit(2);
}
const size = fs.statSync(file).size;
const upload = new tus.Upload(fs.createReadStream(file), {
  endpoint,
  uploadSize: size,
  chunkSize: chunkSize ? Number(chunkSize) : Infinity,
  metadata: { key, filetype: "video/mp4" },
  retryDelays: [0, 200, 500],
  onError(error) {
    console.log(JSON.stringify({ ok: false, error: String(error) }));
    process.exit(1);
  },
  onSuccess() {
    console.log(JSON.stringify({ ok: true, url: upload.url, bytes: size }));
  },
});
upload.start();
