/**
 * The edge server (examples/edge) over real HTTP on 127.0.0.1: streamed and
 * whole-body replies against the reference text, sessions in memory and in
 * Deno KV, 50 concurrent streams, cancellation, the prefix cache, and a 4xx
 * for every kind of bad request.
 */

import { assert, assertEquals, assertMatch } from "@std/assert";
import { loadModel } from "../mod.ts";
import { createHandler, type HandlerOptions } from "../examples/edge/handler.ts";
import { KvSessionStore, MemorySessionStore, type SessionStore } from "../examples/edge/store.ts";
import { readSamples } from "./helpers.ts";

const SAMPLES = await readSamples();

// wasm on one thread is the fastest for this model: about 1 ms a token here, against 5 for js.
const model = await loadModel(new URL("../models/tiny-shakespeare/", import.meta.url), {
  backend: "wasm",
  threads: 1,
});

/** Serves a new handler on a free port for the duration of `body`. */
async function withServer(
  options: HandlerOptions,
  body: (base: string) => Promise<void>,
): Promise<void> {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    createHandler(model, options),
  );
  try {
    await body(`http://127.0.0.1:${server.addr.port}`);
  } finally {
    await server.shutdown();
  }
}

interface SseEvent {
  event: string;
  data: string;
}

/** Server-Sent Events of a response body, per the format's framing rules. */
async function* readSse(response: Response): AsyncGenerator<SseEvent> {
  let buffer = "";
  for await (const text of response.body!.pipeThrough(new TextDecoderStream())) {
    buffer += text.replaceAll("\r\n", "\n");
    for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = value;
        if (field === "data") data.push(value);
      }
      if (data.length > 0) yield { event, data: data.join("\n") };
    }
  }
}

function post(base: string, path: string, body: unknown, init: RequestInit = {}) {
  return fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" || body instanceof ReadableStream ? body : JSON.stringify(body),
    ...init,
  });
}

interface Streamed {
  tokens: number[];
  text: string;
  // deno-lint-ignore no-explicit-any -- the final event's JSON, checked field by field.
  done: any;
  sessionHeader: string | null;
}

/** POSTs to /v1/generate and reads the whole event stream. */
async function generate(base: string, body: Record<string, unknown>): Promise<Streamed> {
  const response = await post(base, "/v1/generate", body);
  assertEquals(response.status, 200, await response.clone().text());
  assertMatch(response.headers.get("content-type") ?? "", /^text\/event-stream/);
  const result: Streamed = {
    tokens: [],
    text: "",
    done: null,
    sessionHeader: response.headers.get("x-session-id"),
  };
  for await (const { event, data } of readSse(response)) {
    assertEquals(result.done, null, "an event after the final one");
    const parsed = JSON.parse(data);
    if (event === "done") {
      result.done = parsed;
    } else {
      assertEquals(event, "message", data);
      result.tokens.push(parsed.token);
      result.text += parsed.text;
    }
  }
  assert(result.done, "the stream ended without its final event");
  return result;
}

async function stats(base: string) {
  return await (await fetch(`${base}/v1/stats`)).json();
}

/** Polls the stats until `ok` holds (a server notices a disconnect asynchronously). */
async function waitForStats(base: string, ok: (s: Record<string, number>) => boolean) {
  for (let i = 0; i < 200; i++) {
    const current = await stats(base);
    if (ok(current)) return current;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`Stats never reached the expected state: ${JSON.stringify(await stats(base))}`);
}

Deno.test("edge: streamed greedy generation equals the reference text", async () => {
  await withServer({}, async (base) => {
    for (const sample of SAMPLES) {
      const { text, tokens, done } = await generate(base, {
        prompt: sample.prompt,
        max_new_tokens: 48,
        temperature: 0,
      });
      assertEquals(sample.prompt + text, sample.greedy_text);
      assertEquals(tokens.length, 48);
      assertEquals(done.generated_tokens, 48);
      assertEquals(done.finish_reason, "length");
      assertEquals(done.prompt_tokens, model.tokenizer.encode(sample.prompt).length);
      assert(done.decode_ms > 0 && done.first_token_ms > 0 && done.tokens_per_second > 0);
      assertEquals(done.session, null);
    }
  });
});

Deno.test("edge: whole-body replies on /v1/generate and /v1/completions", async () => {
  await withServer({}, async (base) => {
    const sample = SAMPLES[2];
    const generated = await (await post(base, "/v1/generate", {
      prompt: sample.prompt,
      max_new_tokens: 48,
      temperature: 0,
      stream: false,
    })).json();
    assertEquals(sample.prompt + generated.text, sample.greedy_text);
    assertEquals(generated.tokens.length, 48);

    const completion = await (await post(base, "/v1/completions", {
      model: "ignored",
      prompt: sample.prompt,
      max_tokens: 48,
      temperature: 0,
    })).json();
    assertEquals(completion.object, "text_completion");
    assertEquals(sample.prompt + completion.choices[0].text, sample.greedy_text);
    assertEquals(completion.choices[0].finish_reason, "length");
    assertEquals(completion.usage.completion_tokens, 48);

    // OpenAI's streaming shape: chunks with choices[0].text, then data: [DONE].
    const response = await post(base, "/v1/completions", {
      prompt: sample.prompt,
      max_tokens: 48,
      temperature: 0,
      stream: true,
    });
    let text = "";
    let last = "";
    for await (const { data } of readSse(response)) {
      last = data;
      if (data !== "[DONE]") text += JSON.parse(data).choices[0].text;
    }
    assertEquals(last, "[DONE]");
    assertEquals(sample.prompt + text, sample.greedy_text);
  });
});

/** Two requests in one session give the tokens of one longer request, and match the library. */
async function checkSessionContinuation(sessions: SessionStore) {
  await withServer({ sessions }, async (base) => {
    const whole = await generate(base, { prompt: "ROMEO:", max_new_tokens: 16, temperature: 0 });

    const first = await generate(base, {
      prompt: "ROMEO:",
      max_new_tokens: 8,
      temperature: 0,
      session: "new",
    });
    const id = first.done.session;
    assertMatch(id, /^[0-9a-f-]{36}$/);
    assertEquals(first.sessionHeader, id);
    const second = await generate(base, {
      prompt: "",
      max_new_tokens: 8,
      temperature: 0,
      session: id,
    });
    assertEquals([...first.tokens, ...second.tokens], whole.tokens);
    assertEquals(second.done.prompt_tokens, 0);

    // A third turn with text of its own, against the library's session API.
    const third = await generate(base, {
      prompt: "\nJULIET:",
      max_new_tokens: 12,
      temperature: 0,
      session: id,
    });
    const reference = model.session();
    const turns: [string, number][] = [["ROMEO:", 16], ["\nJULIET:", 12]];
    const expected: number[][] = [];
    for (const [prompt, maxNewTokens] of turns) {
      const tokens: number[] = [];
      const generation = model.generate(prompt, {
        maxNewTokens,
        temperature: 0,
        session: reference,
      });
      for await (const event of generation) tokens.push(event.token);
      expected.push(tokens);
    }
    reference.dispose();
    assertEquals([...first.tokens, ...second.tokens], expected[0]);
    assertEquals(third.tokens, expected[1]);

    // Deleting forgets it: the id is then unknown.
    assertEquals((await fetch(`${base}/v1/sessions/${id}`, { method: "DELETE" })).status, 204);
    const gone = await post(base, "/v1/generate", { prompt: "", session: id });
    assertEquals(gone.status, 404);
    assertEquals((await gone.json()).error, `Unknown session ${id}`);
  });
}

Deno.test("edge: session continuation, in-memory store", async () => {
  await checkSessionContinuation(new MemorySessionStore());
});

Deno.test("edge: session continuation, Deno KV store, across server restarts", async () => {
  const path = await Deno.makeTempFile({ suffix: ".kv" });
  const kv = await Deno.openKv(path);
  try {
    await checkSessionContinuation(new KvSessionStore(kv));

    // A session saved by one server continues on another over the same database.
    let id = "";
    let firstTokens: number[] = [];
    await withServer({ sessions: new KvSessionStore(kv) }, async (base) => {
      const first = await generate(base, {
        prompt: "First Citizen:",
        max_new_tokens: 6,
        temperature: 0,
        session: "new",
      });
      id = first.done.session;
      firstTokens = first.tokens;
    });
    await withServer({ sessions: new KvSessionStore(kv) }, async (base) => {
      const whole = await generate(base, {
        prompt: "First Citizen:",
        max_new_tokens: 12,
        temperature: 0,
      });
      const next = await generate(base, {
        prompt: "",
        max_new_tokens: 6,
        temperature: 0,
        session: id,
      });
      assertEquals([...firstTokens, ...next.tokens], whole.tokens);
    });
  } finally {
    kv.close();
    await Deno.remove(path);
  }
});

Deno.test("edge: the KV store splits large snapshots and replaces them atomically", async () => {
  const path = await Deno.makeTempFile({ suffix: ".kv" });
  const kv = await Deno.openKv(path);
  try {
    const store = new KvSessionStore(kv, { prefix: "t" });
    // About the size of a mamba-130m snapshot (3.0 MB): 50 chunks, 5 atomic writes.
    const snapshot = new Uint8Array(3_000_001);
    for (let i = 0; i < snapshot.length; i += 65536) {
      crypto.getRandomValues(snapshot.subarray(i, i + 65536));
    }
    await store.set("s", snapshot);
    assertEquals(await store.get("s"), snapshot);
    const small = new Uint8Array([1, 2, 3]);
    await store.set("s", small);
    assertEquals(await store.get("s"), small);
    // The replaced version's chunks are gone: the head and one chunk remain.
    const keys = await Array.fromAsync(kv.list({ prefix: ["t"] }), (entry) => entry.key);
    assertEquals(keys.length, 2);
    assertEquals(await store.delete("s"), true);
    assertEquals(await store.get("s"), null);
    assertEquals(await store.delete("s"), false);
    assertEquals((await Array.fromAsync(kv.list({ prefix: ["t"] }))).length, 0);
  } finally {
    kv.close();
    await Deno.remove(path);
  }
});

Deno.test("edge: 50 concurrent streams give correct, independent outputs", async () => {
  const streams = 50;
  const bodies = Array.from({ length: streams }, (_, i) => {
    const greedy = i % 2 === 0;
    return {
      prompt: SAMPLES[i % SAMPLES.length].prompt,
      max_new_tokens: 24,
      temperature: greedy ? 0 : 0.8,
      seed: i,
    };
  });
  // The sampled streams' references, each from its own generation in the library.
  const expected = await Promise.all(bodies.map(async (body) => {
    if (body.temperature === 0) return null;
    const tokens: number[] = [];
    const options = { maxNewTokens: 24, temperature: 0.8, seed: body.seed };
    for await (const event of model.generate(body.prompt, options)) tokens.push(event.token);
    return tokens;
  }));
  await withServer({ maxConcurrent: streams }, async (base) => {
    const started = performance.now();
    const results = await Promise.all(bodies.map((body) => generate(base, body)));
    console.log(
      `50 streams of 24 tokens: ${(performance.now() - started).toFixed(0)} ms, ` +
        `first token at ${
          Math.max(...results.map((r) => r.done.first_token_ms)).toFixed(0)
        } ms at worst`,
    );
    results.forEach((result, i) => {
      const sample = SAMPLES[i % SAMPLES.length];
      assertEquals(result.tokens.length, 24);
      if (expected[i] === null) {
        assert(
          sample.greedy_text.startsWith(sample.prompt + result.text),
          `stream ${i}: ${JSON.stringify(result.text)}`,
        );
      } else {
        assertEquals(result.tokens, expected[i], `stream ${i}`);
      }
    });
    assertEquals((await stats(base)).active, 0);
  });
});

Deno.test("edge: tokens reach the client as they are generated, not at the end", async () => {
  await withServer({}, async (base) => {
    const response = await post(base, "/v1/generate", {
      prompt: "ROMEO:",
      max_new_tokens: 200,
      ignore_eos: true,
    });
    const arrivals: number[] = [];
    for await (const { event } of readSse(response)) {
      if (event === "message") arrivals.push(performance.now());
    }
    assertEquals(arrivals.length, 200);
    // Had the server held the thread, every event would arrive in one burst at the end.
    const spread = arrivals[arrivals.length - 1] - arrivals[0];
    assert(arrivals[100] - arrivals[0] > spread / 4, `events came in a burst over ${spread} ms`);
  });
});

Deno.test("edge: a cancelled stream stops and frees its slot for the next request", async () => {
  await withServer({ maxConcurrent: 1 }, async (base) => {
    const abort = new AbortController();
    const response = await post(base, "/v1/generate", {
      prompt: "ROMEO:",
      max_new_tokens: 1000,
      temperature: 0,
    }, { signal: abort.signal });
    const events = readSse(response);
    assertEquals((await events.next()).value?.event, "message");

    // At the cap, a second request is refused.
    const refused = await post(base, "/v1/generate", { prompt: "ROMEO:", max_new_tokens: 1 });
    assertEquals(refused.status, 429);
    assertEquals(refused.headers.get("retry-after"), "1");
    assertMatch((await refused.json()).error, /^Too many generations running/);

    abort.abort();
    await events.return(undefined).catch(() => {});
    const after = await waitForStats(base, (s) => s.active === 0);
    assertEquals(after.aborted, 1);
    assertEquals(after.rejected, 1);

    const next = await generate(base, { prompt: "ROMEO:", max_new_tokens: 4, temperature: 0 });
    assertEquals(next.tokens.length, 4);

    // A whole-body request notices the disconnect through request.signal.
    const early = new AbortController();
    const pending = post(base, "/v1/generate", {
      prompt: "ROMEO:",
      max_new_tokens: 1000,
      stream: false,
    }, { signal: early.signal }).catch((error) => error);
    await waitForStats(base, (s) => s.active === 1);
    early.abort();
    assert((await pending) instanceof DOMException);
    const settled = await waitForStats(base, (s) => s.active === 0);
    assertEquals(settled.aborted, 2);
  });
});

Deno.test("edge: a prefix-cache hit gives the same output as a miss", async () => {
  // A long shared prefix (about 400 tokens), then different endings.
  const prefix = SAMPLES.map((s) => s.greedy_text).join("\n\n").repeat(3);
  const endings = ["\n\nROMEO:", "\n\nJULIET:"];
  const run = async (options: HandlerOptions) => {
    const outputs: Streamed[] = [];
    await withServer(options, async (base) => {
      // Warm the cache with the prefix alone (no tokens generated).
      const warm = await generate(base, { prompt: prefix, max_new_tokens: 0, temperature: 0 });
      assertEquals(warm.tokens.length, 0);
      for (const ending of endings) {
        outputs.push(
          await generate(base, { prompt: prefix + ending, max_new_tokens: 16, temperature: 0 }),
        );
      }
      const { prefixCache } = await stats(base);
      if (options.prefixCacheBytes !== 0) {
        assertEquals([prefixCache.hits, prefixCache.misses], [2, 1]);
        assertEquals(prefixCache.entries, 3);
      }
    });
    return outputs;
  };
  const hits = await run({});
  const misses = await run({ prefixCacheBytes: 0 });
  const prefixTokens = model.tokenizer.encode(prefix).length;
  hits.forEach((hit, i) => {
    assertEquals(hit.tokens, misses[i].tokens);
    assertEquals(hit.done.cached_tokens, prefixTokens);
    assertEquals(misses[i].done.cached_tokens, 0);
    console.log(
      `prompt of ${hit.done.prompt_tokens} tokens: prefill ${hit.done.prefill_ms} ms with ` +
        `${prefixTokens} cached, ${misses[i].done.prefill_ms} ms without`,
    );
  });
});

Deno.test("edge: every bad request gets a 4xx with a JSON error", async () => {
  const sessions = new MemorySessionStore();
  await sessions.set("from-another-model", new Uint8Array(40));
  await withServer(
    { maxPromptTokens: 64, maxNewTokens: 100, maxBodyBytes: 4096, sessions },
    async (base) => {
      const expectError = async (response: Response, status: number, pattern: RegExp) => {
        assertEquals(response.status, status);
        assertMatch(response.headers.get("content-type") ?? "", /^application\/json/);
        const { error } = await response.json();
        assertMatch(error, pattern);
        assertMatch(error, /^[A-Z]/); // Sentence case.
      };
      const generatePost = (body: unknown) => post(base, "/v1/generate", body);
      await expectError(await generatePost("{not json"), 400, /not valid JSON/);
      await expectError(await generatePost("[1, 2]"), 400, /must be a JSON object/);
      await expectError(await generatePost({}), 400, /prompt is required/);
      await expectError(await generatePost({ prompt: 42 }), 400, /prompt must be a string/);
      await expectError(
        await generatePost({ prompt: "A", max_new_tokens: "5" }),
        400,
        /max_new_tokens must be an integer/,
      );
      await expectError(
        await generatePost({ prompt: "A", max_new_tokens: -1 }),
        400,
        /max_new_tokens must be an integer from 0 to 100/,
      );
      await expectError(
        await generatePost({ prompt: "A", max_new_tokens: 101 }),
        400,
        /max_new_tokens must be an integer from 0 to 100/,
      );
      await expectError(
        await generatePost({ prompt: "A", temperature: -0.5 }),
        400,
        /temperature must be a finite number/,
      );
      await expectError(await generatePost({ prompt: "A", top_k: 1.5 }), 400, /top_k/);
      await expectError(await generatePost({ prompt: "A", top_p: 0 }), 400, /top_p/);
      await expectError(await generatePost({ prompt: "A", seed: -3 }), 400, /seed/);
      await expectError(await generatePost({ prompt: "A", stream: "yes" }), 400, /stream/);
      await expectError(await generatePost({ prompt: "A", stop: [1] }), 400, /stop/);
      await expectError(
        await generatePost({ prompt: "A", max_tokens: 5 }),
        400,
        /Unknown field max_tokens/,
      );
      await expectError(await generatePost({ prompt: "" }), 400, /must not be empty/);
      await expectError(
        await generatePost({ prompt: "ROMEO: ".repeat(40) }),
        400,
        /tokens; the limit is 64/,
      );
      await expectError(
        await generatePost({ prompt: "A", session: "no such id" }),
        400,
        /session must be "new" or a session id/,
      );
      await expectError(
        await generatePost({ prompt: "A", session: crypto.randomUUID() }),
        404,
        /^Unknown session/,
      );
      await expectError(
        await generatePost({ prompt: "A", session: "from-another-model" }),
        409,
        /^Session from-another-model cannot continue on this model: Invalid snapshot/,
      );
      await expectError(
        await post(base, "/v1/completions", { prompt: "A", n: 2 }),
        400,
        /n must be an integer from 1 to 1/,
      );
      await expectError(
        await post(base, "/v1/completions", { prompt: ["A", "B"] }),
        400,
        /prompt must be a string/,
      );

      // Oversized bodies, with a Content-Length and streamed without one.
      const big = JSON.stringify({ prompt: "A".repeat(5000) });
      await expectError(await generatePost(big), 413, /over 4096 bytes/);
      const chunked = new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode(big));
          controller.close();
        },
      });
      await expectError(await generatePost(chunked), 413, /over 4096 bytes/);

      await expectError(await fetch(`${base}/v1/generate`), 405, /Use POST/);
      await expectError(await fetch(`${base}/v1/nothing`), 404, /No endpoint at \/v1\/nothing/);
      await expectError(
        await fetch(`${base}/v1/sessions/abc`, { method: "GET" }),
        405,
        /Use DELETE/,
      );
      await expectError(
        await fetch(`${base}/v1/sessions/abc`, { method: "DELETE" }),
        404,
        /Unknown session abc/,
      );

      // A session that is generating refuses a second request for it.
      const first = await generate(base, { prompt: "A", max_new_tokens: 1, session: "new" });
      const id = first.done.session;
      const busy = await generatePost({ prompt: "", max_new_tokens: 100, session: id });
      await expectError(await generatePost({ prompt: "", session: id }), 409, /already/);
      await busy.body?.cancel();

      // Nothing leaked: no generation is left running once the cancelled one notices.
      await waitForStats(base, (s) => s.active === 0);
    },
  );
});
