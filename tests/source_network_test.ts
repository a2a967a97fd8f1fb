/**
 * Hub downloads that fail well: a server that never answers or stalls
 * mid-body times out with the cause and offline advice, and a server error
 * is retried with back-off.
 */

import { assert, assertEquals, assertRejects, assertStringIncludes } from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { loadModel } from "../src/load.ts";
import { SHARED, tempDir } from "./helpers.ts";

const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;

/** A TCP server that accepts connections and never writes a byte. */
function silentServer(): { url: string; close(): void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  (async () => {
    for await (const conn of listener) conns.push(conn);
  })();
  return {
    url: `http://127.0.0.1:${listener.addr.port}`,
    close() {
      for (const conn of conns) conn.close();
      listener.close();
    },
  };
}

Deno.test("a hub that accepts and never answers times out, retried, with offline advice", async () => {
  const cacheDir = await tempDir();
  const server = silentServer();
  try {
    const started = performance.now();
    const error = await assertRejects(
      () =>
        loadModel("someone/model", {
          hfEndpoint: server.url,
          cacheDir,
          timeoutMs: 200,
          retries: 1,
        }),
      ModelFileError,
    );
    assertStringIncludes(error.message, `${server.url}/someone/model/resolve/main/config.json`);
    assertStringIncludes(error.message, "Cannot fetch (2 attempts): No answer within 0.2 s");
    assertStringIncludes(error.message, "To work offline");
    assertStringIncludes(error.message, "HF_ENDPOINT");
    // Two time-outs and one back-off of 0.5 s.
    assert(performance.now() - started < 5000);
  } finally {
    server.close();
  }
});

Deno.test("a refused connection names the cause", async () => {
  const cacheDir = await tempDir();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close(); // Nothing listens there now.
  const error = await assertRejects(
    () =>
      loadModel("someone/model", {
        hfEndpoint: `http://127.0.0.1:${port}`,
        cacheDir,
        retries: 0,
      }),
    ModelFileError,
  );
  assertStringIncludes(error.message, "Cannot fetch (1 attempts)");
  assert(/refused/i.test(error.message), error.message);
});

Deno.test("a 503 is retried and then the model loads", async () => {
  const cacheDir = await tempDir();
  let failures = 1;
  const controller = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: controller.signal, onListen() {} },
    async (request) => {
      const name = new URL(request.url).pathname.split("/").pop()!;
      if (failures > 0) {
        failures--;
        return new Response("busy", { status: 503 });
      }
      const bytes = await Deno.readFile(`${SHAKESPEARE}/${name}`).catch(() => null);
      if (bytes === null) return new Response("no", { status: 404 });
      return new Response(bytes);
    },
  );
  try {
    const origin = `http://127.0.0.1:${server.addr.port}`;
    const model = await loadModel("someone/model", {
      hfEndpoint: origin,
      cacheDir,
      backend: "js",
      timeoutMs: 2000,
    });
    assertEquals(failures, 0);
    assertEquals(model.config.vocabSize > 0, true);
  } finally {
    controller.abort();
    await server.finished;
  }
});

Deno.test("a download whose body stalls ends with a clear error", async () => {
  const cacheDir = await tempDir();
  const controller = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: controller.signal, onListen() {} },
    () => {
      // Promises 100 bytes, sends 10, then nothing.
      const body = new ReadableStream<Uint8Array>({
        start(stream) {
          stream.enqueue(new Uint8Array(10));
        },
      });
      return new Response(body, { headers: { "content-length": "100" } });
    },
  );
  try {
    const error = await assertRejects(
      () =>
        loadModel("someone/model", {
          hfEndpoint: `http://127.0.0.1:${server.addr.port}`,
          cacheDir,
          timeoutMs: 300,
        }),
      ModelFileError,
    );
    assertStringIncludes(error.message, "config.json: Download stalled: no data for 0.3 s");
  } finally {
    controller.abort();
    await server.finished;
  }
});
