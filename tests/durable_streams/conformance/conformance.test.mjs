// The official Durable Streams server conformance suite, against a running tether server.
// TETHER_DS_URL names it (default http://127.0.0.1:4437); run.sh starts one and runs this file.
import { describe } from "vitest";
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const baseUrl = process.env.TETHER_DS_URL ?? "http://127.0.0.1:4437";

describe("tether: Durable Streams conformance", () => {
  runConformanceTests({ baseUrl });
});
