// The Durable Streams reference server for bench/durable_streams.py.
//   node server.mjs PORT [DATA_DIR]   in-memory, or file-backed (LMDB + append-only logs)
// Compression is off (tether does not compress HTTP bodies either); the long-poll timeout is
// tether's default (20 s).
import { DurableStreamTestServer } from "@durable-streams/server";

const [port, dataDir] = process.argv.slice(2);
const server = new DurableStreamTestServer({
  port: Number(port),
  host: "127.0.0.1",
  compression: false,
  longPollTimeout: 20000,
  ...(dataDir ? { dataDir } : {}),
});
await server.start();
console.log(`reference server on ${server.url} (${dataDir ? "file-backed" : "in-memory"})`);
const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
