/**
 * The edge server (examples/edge) exposed to clients that may be hostile:
 * API keys, per-key (tenant) prefix caches and sessions, the prompt's byte
 * limit before tokenizing, malformed session ids, clients that leave during
 * the upload, the model's name in replies, and start-up errors that end the
 * process with one line before the model loads.
 */

import { assert, assertEquals, assertMatch } from "@std/assert";
import { loadModel } from "../mod.ts";
import { createHandler, type HandlerOptions } from "../examples/edge/handler.ts";
import { modelNameOf } from "../examples/edge/main.ts";

const model = await loadModel(new URL("../models/tiny-shakespeare/", import.meta.url), {
  backend: "wasm",
  threads: 1,
});

const MAIN = new URL("../examples/edge/main.ts", import.meta.url).pathname;
const CONFIG = new URL("../deno.json", import.meta.url).pathname;

async function withServer(
  options: HandlerOptions,
  body: (base: string, port: number) => Promise<void>,
): Promise<void> {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    createHandler(model, options),
  );
  try {
    await body(`http://127.0.0.1:${server.addr.port}`, server.addr.port);
  } finally {
    await server.shutdown();
  }
}

function post(base: string, path: string, body: unknown, key?: string): Promise<Response> {
  return fetch(`${base}${path}`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(key === undefined ? {} : { authorization: `Bearer ${key}` }),
    },
    body: JSON.stringify(body),
  });
}

const KEYS = ["key-alice-0123456789", "key-bob-9876543210"];

Deno.test("edge security: with API keys, a request without a valid key gets 401 and a JSON error", async () => {
  await withServer({ apiKeys: KEYS }, async (base) => {
    const request = { prompt: "ROMEO:", max_new_tokens: 2, stream: false };
    const missing = await post(base, "/v1/generate", request);
    assertEquals(missing.status, 401);
    assertEquals(missing.headers.get("www-authenticate"), "Bearer");
    assertMatch((await missing.json()).error, /API key is required.*Authorization: Bearer/);
    const wrong = await post(base, "/v1/generate", request, "key-alice-0123456788");
    assertEquals(wrong.status, 401);
    assertEquals((await wrong.json()).error, "The API key is not valid");
    const prefix = await post(base, "/v1/generate", request, KEYS[0].slice(0, 5));
    assertEquals(prefix.status, 401);
    await prefix.body?.cancel();
    const stats = await fetch(`${base}/v1/stats`);
    assertEquals(stats.status, 401);
    await stats.body?.cancel();
    for (const key of KEYS) {
      const ok = await post(base, "/v1/generate", request, key);
      assertEquals(ok.status, 200);
      assertEquals((await ok.json()).generated_tokens, 2);
    }
  });
});

Deno.test("edge security: a tenant's prefix cache reports no hit for another tenant's prompt", async () => {
  await withServer({ apiKeys: KEYS }, async (base) => {
    const secret = "My bank PIN is 4821. ROMEO:";
    const request = { prompt: secret, max_new_tokens: 1, stream: false };
    const first = await (await post(base, "/v1/generate", request, KEYS[0])).json();
    assertEquals(first.cached_tokens, 0);
    // The guess of another tenant, right or wrong, learns nothing.
    const guess = await (await post(base, "/v1/generate", request, KEYS[1])).json();
    assertEquals(guess.cached_tokens, 0);
    assert(guess.prompt_tokens > 0);
    // The owner's own repeat does hit: the cache works, within the tenant.
    const again = await (await post(base, "/v1/generate", request, KEYS[0])).json();
    assertEquals(again.cached_tokens, first.prompt_tokens);
  });
});

Deno.test("edge security: a session id belongs to the tenant that created it", async () => {
  await withServer({ apiKeys: KEYS }, async (base) => {
    const created = await post(
      base,
      "/v1/generate",
      { prompt: "ROMEO:", max_new_tokens: 2, stream: false, session: "new" },
      KEYS[0],
    );
    const id = (await created.json()).session;
    assertEquals(typeof id, "string");
    const stolen = await post(
      base,
      "/v1/generate",
      { prompt: "", max_new_tokens: 2, stream: false, session: id },
      KEYS[1],
    );
    assertEquals(stolen.status, 404);
    await stolen.body?.cancel();
    const deleted = await fetch(`${base}/v1/sessions/${id}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${KEYS[1]}` },
    });
    assertEquals(deleted.status, 404);
    await deleted.body?.cancel();
    const own = await post(
      base,
      "/v1/generate",
      { prompt: "", max_new_tokens: 2, stream: false, session: id },
      KEYS[0],
    );
    assertEquals(own.status, 200);
    await own.body?.cancel();
  });
});

Deno.test("edge security: a prompt over the byte limit is refused before it is tokenized", async () => {
  await withServer({ maxBodyBytes: 2 << 20 }, async (base) => {
    const prompt = "To be, or not to be. ".repeat(45_000); // 945,000 bytes
    const response = await post(base, "/v1/generate", { prompt, stream: false });
    assertEquals(response.status, 400);
    // The default limit is 16 bytes per prompt token: 65,536 for 4,096 tokens.
    assertEquals(
      (await response.json()).error,
      "The prompt has 945000 bytes; the limit is 65536",
    );
  });
});

Deno.test("edge security: long prompts are tokenized in slices; the event loop never stalls for long", async () => {
  // Four different prompts just inside the 65,536-byte limit, from the shared Shakespeare.
  const shakespeare = await Deno.readTextFile(
    new URL("../../shared/data/tinyshakespeare.txt", import.meta.url),
  );
  const prompts = [0, 1, 2, 3].map((i) => shakespeare.slice(100_000 * i, 100_000 * i + 65_000));
  const counts = prompts.map((prompt) => model.tokenizer.encode(prompt).length);
  // How long one prompt holds the thread when tokenized in one piece (the median of four).
  const onePiece = prompts.map((prompt) => {
    const start = performance.now();
    model.tokenizer.encode(prompt);
    return performance.now() - start;
  }).sort((a, b) => a - b)[2];

  /** Sends the four prompts at once; returns the longest time between two timer ticks. */
  const longestStall = async () => {
    let longest = 0;
    await withServer({}, async (base) => {
      let last = performance.now();
      const ticker = setInterval(() => {
        const now = performance.now();
        longest = Math.max(longest, now - last);
        last = now;
      }, 1);
      try {
        const responses = await Promise.all(
          prompts.map((prompt) => post(base, "/v1/generate", { prompt, stream: false })),
        );
        for (const [i, response] of responses.entries()) {
          // Tokenized in full, to the ids of the whole text, then refused for their count.
          assertEquals(response.status, 400);
          assertEquals(
            (await response.json()).error,
            `The prompt has ${counts[i]} tokens; the limit is 4096`,
          );
        }
      } finally {
        clearInterval(ticker);
      }
    });
    return longest;
  };

  // In one piece the longest stall would be at least onePiece. In slices of
  // 1,024 characters (1/64 of a prompt) it is a few ms; the best of three
  // runs is taken because other processes on a loaded machine can hold this
  // one back for tens of ms at any time.
  const stalls: number[] = [];
  for (let run = 0; run < 3 && !stalls.some((stall) => stall < onePiece / 2); run++) {
    stalls.push(await longestStall());
  }
  assert(
    Math.min(...stalls) < onePiece / 2,
    `the event loop stalled for ${stalls.map((stall) => stall.toFixed(1)).join(", ")} ms; ` +
      `one prompt in one piece takes ${onePiece.toFixed(1)} ms`,
  );
});

Deno.test("edge security: a malformed percent-encoded session id is a 400", async () => {
  await withServer({}, async (base) => {
    const response = await fetch(`${base}/v1/sessions/%E0%A4%A`, { method: "DELETE" });
    assertEquals(response.status, 400);
    assertMatch((await response.json()).error, /not valid percent-encoded UTF-8/);
  });
});

Deno.test("edge security: a client leaving during the body upload is no internal error", async () => {
  const logged: unknown[][] = [];
  const consoleError = console.error;
  console.error = (...args: unknown[]) => logged.push(args);
  try {
    await withServer({}, async (_base, port) => {
      const connection = await Deno.connect({ hostname: "127.0.0.1", port });
      const head = "POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\n" +
        "content-type: application/json\r\ncontent-length: 100000\r\n\r\n" + '{"prompt": "ROM';
      await connection.write(new TextEncoder().encode(head));
      await new Promise((resolve) => setTimeout(resolve, 100));
      connection.close();
      await new Promise((resolve) => setTimeout(resolve, 200));
      // The server goes on serving.
      const stats = await fetch(`${serverUrl(port)}/v1/stats`);
      assertEquals(stats.status, 200);
      assertEquals((await stats.json()).active, 0);
    });
  } finally {
    console.error = consoleError;
  }
  assertEquals(logged, []);
});

function serverUrl(port: number): string {
  return `http://127.0.0.1:${port}`;
}

Deno.test("edge security: replies name the model, not the path it was loaded from", async () => {
  assertEquals(modelNameOf("/srv/models/tiny-shakespeare/"), "tiny-shakespeare");
  assertEquals(modelNameOf(new URL("file:///srv/models/mamba-130m/")), "mamba-130m");
  assertEquals(modelNameOf("state-spaces/mamba-130m-hf"), "mamba-130m-hf");
  assertEquals(modelNameOf("C:\\models\\mamba"), "mamba");
  await withServer({ modelName: "tiny-shakespeare" }, async (base) => {
    const reply = await (await post(base, "/v1/completions", {
      prompt: "ROMEO:",
      max_tokens: 1,
      stream: false,
    })).json();
    assertEquals(reply.model, "tiny-shakespeare");
  });
});

/** Runs main.ts with `env`; its exit code, its stderr, and how long it took. */
async function startServer(env: Record<string, string>) {
  const started = performance.now();
  const output = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      `--config=${CONFIG}`,
      "--allow-net=127.0.0.1",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      MAIN,
    ],
    // A model that does not exist: an error about it means the settings were checked too late.
    env: { MAMBA_MODEL: "/nonexistent/model", NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  return {
    code: output.code,
    stderr: new TextDecoder().decode(output.stderr),
    ms: performance.now() - started,
  };
}

Deno.test("edge security: start-up errors print one line and exit 1 before the model loads", async () => {
  const badValue = await startServer({ MAMBA_MAX_CONCURRENT: "eight" });
  assertEquals(badValue.code, 1);
  assertEquals(
    badValue.stderr,
    'error: MAMBA_MAX_CONCURRENT must be an integer of 1 or more, got "eight"\n',
  );
  const badStore = await startServer({ MAMBA_SESSION_STORE: "redis" });
  assertEquals(badStore.code, 1);
  assertEquals(
    badStore.stderr,
    'error: MAMBA_SESSION_STORE must be "memory" or "kv", got "redis"\n',
  );
  const badKeys = await startServer({ MAMBA_API_KEYS: "good,bad key" });
  assertEquals(badKeys.code, 1);
  assertEquals(
    badKeys.stderr,
    "error: MAMBA_API_KEYS must hold printable ASCII keys without spaces\n",
  );
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const { port } = listener.addr as Deno.NetAddr;
    const inUse = await startServer({ PORT: String(port) });
    assertEquals(inUse.code, 1);
    assertEquals(inUse.stderr, `error: Cannot listen on 127.0.0.1:${port}: the port is in use\n`);
  } finally {
    listener.close();
  }
});

Deno.test("edge security: one API key at its concurrency cap gets 429 while another key still runs", async () => {
  await withServer(
    { apiKeys: KEYS, maxConcurrent: 4, maxConcurrentPerKey: 1 },
    async (base) => {
      const abort = new AbortController();
      const running = await fetch(`${base}/v1/generate`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${KEYS[0]}` },
        body: JSON.stringify({ prompt: "ROMEO:", max_new_tokens: 1000, temperature: 0 }),
        signal: abort.signal,
      });
      assertEquals(running.status, 200);
      const reader = running.body!.getReader();
      assert(!(await reader.read()).done, "the first key's stream has begun");

      const refused = await post(
        base,
        "/v1/generate",
        { prompt: "ROMEO:", max_new_tokens: 1 },
        KEYS[0],
      );
      assertEquals(refused.status, 429);
      assertEquals(refused.headers.get("retry-after"), "1");
      assertMatch((await refused.json()).error, /for this API key \(the limit per key is 1\)/);
      const other = await post(
        base,
        "/v1/generate",
        { prompt: "ROMEO:", max_new_tokens: 2, stream: false },
        KEYS[1],
      );
      assertEquals(other.status, 200);
      assertEquals((await other.json()).generated_tokens, 2);

      // Once the first key's stream ends, its slot is its own again.
      abort.abort();
      await reader.cancel().catch(() => {});
      for (let tries = 0;; tries++) {
        const again = await post(
          base,
          "/v1/generate",
          { prompt: "ROMEO:", max_new_tokens: 2, stream: false },
          KEYS[0],
        );
        if (again.status === 200) {
          assertEquals((await again.json()).generated_tokens, 2);
          break;
        }
        assertEquals(again.status, 429);
        await again.body?.cancel();
        assert(tries < 100, "the aborted stream never gave its slot back");
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    },
  );
});
