// @durable-streams/client against tether, driven by test_interop.py.
//   node interop.mjs write URL TOKEN JSON_ARRAY    create a JSON stream (if new), append each
//                                                  item with an IdempotentProducer; prints
//                                                  {"offset": tail}
//   node interop.mjs read URL TOKEN [OFFSET]       catch-up read; prints {"items", "offset"}
//   node interop.mjs tail URL TOKEN OFFSET COUNT   live read (SSE, long-poll as fallback) from
//                                                  OFFSET until COUNT items came; prints them
import { DurableStream, IdempotentProducer, stream } from "@durable-streams/client";

const [command, url, token, arg, count] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${token}` };

async function write(items) {
  let handle;
  try {
    handle = await DurableStream.create({ url, headers, contentType: "application/json" });
  } catch {
    handle = await DurableStream.connect({ url, headers });
  }
  const producer = new IdempotentProducer(handle, "node-writer", {
    autoClaim: true,
    onError: (err) => {
      console.error(err);
      process.exit(1);
    },
  });
  for (const item of items) producer.append(JSON.stringify(item));
  await producer.flush();
  await producer.close();
  const { offset } = await handle.head();
  return { offset };
}

async function read(offset) {
  const res = await stream({ url, headers, offset: offset ?? "-1", live: false });
  const items = await res.json();
  return { items, offset: res.offset };
}

async function tail(offset, wanted) {
  const res = await stream({ url, headers, offset, live: true });
  const items = [];
  await new Promise((resolve, reject) => {
    res.subscribeJson(async (batch) => {
      items.push(...batch.items);
      if (items.length >= wanted) resolve();
    });
    res.closed?.catch?.(reject);
  });
  res.cancel?.();
  return { items, offset: res.offset };
}

let result;
if (command === "write") result = await write(JSON.parse(arg));
else if (command === "read") result = await read(arg);
else if (command === "tail") result = await tail(arg, Number(count));
else throw new Error(`unknown command ${command}`);
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
