// The tus peer for ops/bench: @tus/server + @tus/s3-store on loopback, in front of the same S3
// store (SeaweedFS) chunkgate uses. Configured only by environment:
//   TUS_PEER_PORT (0 = any free port), S3_ENDPOINT, S3_BUCKET, S3_REGION, PART_SIZE (bytes).
// Prints exactly one ready line to stdout: "tus-peer listening on http://127.0.0.1:PORT".
// It must never be exposed beyond loopback: no auth, dummy credentials.
import { Server } from "@tus/server";
import { S3Store } from "@tus/s3-store";

const store = new S3Store({
  partSize: Number(process.env.PART_SIZE || 8 * 1024 * 1024),
  s3ClientConfig: {
    bucket: process.env.S3_BUCKET,
    region: process.env.S3_REGION || "us-east-1",
    endpoint: process.env.S3_ENDPOINT,
    forcePathStyle: true,
    credentials: {
      accessKeyId: process.env.AWS_ACCESS_KEY_ID || "test",
      secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY || "test",
    },
    // SeaweedFS rejects the SDK's default flexible checksums on UploadPart (PATCH -> 500).
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  },
});

const server = new Server({ path: "/files", datastore: store });
const http = server.listen({ host: "127.0.0.1", port: Number(process.env.TUS_PEER_PORT || 0) }, () => {
  console.log(`tus-peer listening on http://127.0.0.1:${http.address().port}`);
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => http.close(() => process.exit(0)));
