/**
 * The edge server (examples/edge) over real HTTP on 127.0.0.1: streamed and
 * whole-body replies against the reference text, sessions in memory and in
 * Deno KV, 50 concurrent streams, cancellation, the prefix cache, a 4xx for
 * every kind of bad request, and scale-out: session turns on one Deno KV
 * database shared by several stores, then by two real server processes
 * (examples/edge/main.ts) serving one conversation alternately, racing for
 * it, and one of them killed in the middle of a reply.
 */

import { assert, assertEquals, assertMatch, assertRejects } from "@std/assert";
import { loadModel } from "../mod.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { createHandler, type HandlerOptions, type ServerStats } from "../examples/edge/handler.ts";
import {
  KvSessionStore,
  MemorySessionStore,
  openKv,
  retryWhileBusy,
  SessionBusyError,
  SessionConflictError,
  type SessionStore,
} from "../examples/edge/store.ts";
import { readSamples, SHARED } from "./helpers.ts";

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
async function generate(
  base: string,
  body: Record<string, unknown>,
  init: RequestInit = {},
): Promise<Streamed> {
  const response = await post(base, "/v1/generate", body, init);
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
async function waitForStats(base: string, ok: (s: ServerStats) => boolean) {
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

    // Two turns (the second and third requests) on the stored session, none refused.
    const { sessions: counters } = await stats(base);
    assertEquals([counters.turns, counters.busy], [2, 0]);

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
  const kv = await openKv(path);
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

/**
 * A new session's first turn on `a` (and `b`, another store on the same
 * data, if given): its id is refused to begin, delete and create until the
 * turn commits; a released first turn leaves the id unknown.
 */
async function checkFirstTurn(a: SessionStore, b: SessionStore = a): Promise<void> {
  const first = await a.create("n");
  await assertRejects(() => b.begin("n"), SessionBusyError);
  await assertRejects(() => b.delete("n"), SessionBusyError);
  await assertRejects(() => b.create("n"), SessionBusyError);
  const v1 = randomBytes(1000);
  await first.commit(v1);
  await assertRejects(() => b.create("n"), Error, "Session n exists already");
  const turn = (await b.begin("n"))!;
  assertEquals(turn.snapshot, v1);
  await turn.release();

  const dropped = await a.create("m");
  await dropped.release();
  assertEquals(await b.begin("m"), null);
  assertEquals(await b.delete("m"), false);
  assertEquals(await b.delete("n"), true);
}

Deno.test("edge: a new session's first turn holds its id, in memory and in KV", async () => {
  await checkFirstTurn(new MemorySessionStore());
  await withTwoKvStores({}, async (a, b, kv) => {
    await checkFirstTurn(a, b);
    assertEquals(
      (await retryWhileBusy(() => Array.fromAsync(kv.list({ prefix: ["t"] })))).length,
      0,
    );
  });
});

/**
 * During a new session's first streamed reply, a continue and a delete of
 * its id get 409 (as during any later reply); once the reply ends, the
 * session continues from it.
 */
async function checkFirstReplyHoldsSession(sessions: SessionStore): Promise<void> {
  await withServer({ sessions }, async (base) => {
    const response = await post(base, "/v1/generate", {
      prompt: "ROMEO:",
      max_new_tokens: 1000,
      ignore_eos: true,
      temperature: 0,
      session: "new",
    });
    assertEquals(response.status, 200);
    const id = response.headers.get("x-session-id")!;
    const events = readSse(response);
    assertEquals((await events.next()).value?.event, "message"); // The reply is under way.

    const busyContinue = await post(base, "/v1/generate", { prompt: "", session: id });
    assertEquals(busyContinue.status, 409, await busyContinue.clone().text());
    await busyContinue.body?.cancel();
    const busyDelete = await fetch(`${base}/v1/sessions/${id}`, { method: "DELETE" });
    assertEquals(busyDelete.status, 409);
    await busyDelete.body?.cancel();

    let last: SseEvent | undefined;
    for await (const event of events) last = event;
    assertEquals(last?.event, "done");
    const next = await generate(base, {
      prompt: "",
      max_new_tokens: 2,
      temperature: 0,
      session: id,
    });
    assertEquals(next.tokens.length, 2);
  });
}

Deno.test("edge: a new session's first reply holds its id against continues and deletes", async () => {
  await checkFirstReplyHoldsSession(new MemorySessionStore());
  await withTempKv((kv) => checkFirstReplyHoldsSession(new KvSessionStore(kv)));
});

Deno.test("edge: the KV store splits large snapshots and replaces them atomically", async () => {
  const path = await Deno.makeTempFile({ suffix: ".kv" });
  const kv = await openKv(path);
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
        /Unknown field "max_tokens"/,
      );
      await expectError(await generatePost({ prompt: "" }), 400, /must not be empty/);
      // A long bad value is repeated cut short, not whole.
      const long = await generatePost({ prompt: "A", temperature: "9".repeat(3000) });
      assertEquals(long.status, 400);
      const { error: longError } = await long.json();
      assertMatch(longError, /^Field temperature must be .*, got "9{79}… \(cut\)$/);
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
      // Methods named as Object.prototype's members are no routes either.
      for (const method of ["toString", "constructor", "valueOf", "hasOwnProperty"]) {
        await expectError(await fetch(`${base}/v1/generate`, { method }), 405, /Use POST/);
        await expectError(await fetch(`${base}/v1/stats`, { method }), 405, /Use GET/);
      }
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
      await expectError(
        await fetch(`${base}/v1/sessions/${"x".repeat(3000)}`, { method: "DELETE" }),
        400,
        /not one this server issues/,
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

// ---------------------------------------------------------------------------
// Scale-out: several stores, then several server processes, on one Deno KV.

/** `length` random bytes (a stand-in snapshot). */
function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i += 65536) crypto.getRandomValues(bytes.subarray(i, i + 65536));
  return bytes;
}

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Checks that session `id` under `prefix` is whole: a head, exactly the
 * chunks of the version it names, and no lease (no turn open, none left over).
 */
async function assertSessionClean(kv: Deno.Kv, prefix: string, id: string): Promise<void> {
  const entries = await retryWhileBusy(() => Array.fromAsync(kv.list({ prefix: [prefix, id] })));
  const head = await retryWhileBusy(() =>
    kv.get<{ version: string; chunks: number }>([prefix, id])
  );
  assert(head.value, `session ${id} has no head`);
  const others = entries.map((entry) => entry.key.slice(2));
  assertEquals(
    others.map((rest) => rest[0]),
    Array(head.value.chunks).fill(head.value.version),
    `stray entries of session ${id}: ${JSON.stringify(others)}`,
  );
}

/** Runs `body` with a KV database in a new temporary file, removed afterwards. */
async function withTempKv(body: (kv: Deno.Kv, path: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "mamba-edge-kv-" });
  const path = `${dir}/sessions.kv`;
  try {
    const kv = await openKv(path);
    try {
      await body(kv, path);
    } finally {
      kv.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Two stores on two handles of one KV file: two processes, as far as KV can tell. */
function withTwoKvStores(
  options: { leaseMs?: number },
  body: (a: KvSessionStore, b: KvSessionStore, kv: Deno.Kv) => Promise<void>,
): Promise<void> {
  return withTempKv(async (kv, path) => {
    const other = await openKv(path);
    try {
      await body(
        new KvSessionStore(kv, { prefix: "t", ...options }),
        new KvSessionStore(other, { prefix: "t", ...options }),
        kv,
      );
    } finally {
      other.close();
    }
  });
}

Deno.test("edge: KV session turns are exclusive across stores and always start from the latest version", async () => {
  await withTwoKvStores({}, async (a, b, kv) => {
    const v1 = randomBytes(200_000);
    await a.set("s", v1);
    assertEquals(await b.begin("unknown"), null);

    const turn = (await b.begin("s"))!;
    assertEquals(turn.snapshot, v1);
    // Refused at once, whichever store (process) asks: nothing would be generated.
    await assertRejects(() => a.begin("s"), SessionBusyError, "Session s is generating a reply");
    await assertRejects(() => b.begin("s"), SessionBusyError);
    await assertRejects(() => a.delete("s"), SessionBusyError);
    const v2 = randomBytes(130_000);
    await turn.commit(v2);
    await turn.release(); // After a commit: nothing to do.
    await assertSessionClean(kv, "t", "s");

    // Store a cached v1 when it saved it; KV names v2 now: the cache must not be used.
    const second = (await a.begin("s"))!;
    assertEquals(second.snapshot, v2);
    assertEquals([a.stats().cacheHits, a.stats().cacheMisses], [0, 1]);
    await second.release(); // Ends the turn, leaving v2.
    const third = (await a.begin("s"))!;
    assertEquals(third.snapshot, v2);
    assertEquals([a.stats().cacheHits, a.stats().cacheMisses], [1, 1]); // Now it is current.
    const v3 = randomBytes(70_000);
    await third.commit(v3);
    assertEquals(await b.get("s"), v3); // b's cached v2 is stale: read anew.
    assertEquals(await a.get("s"), v3);
    assertEquals(b.stats().busy, 1);
    assertEquals(a.stats().busy, 2);
    await assertSessionClean(kv, "t", "s");
    assertEquals(await b.delete("s"), true);
    assertEquals(await a.begin("s"), null);
    assertEquals(
      (await retryWhileBusy(() => Array.fromAsync(kv.list({ prefix: ["t"] })))).length,
      0,
    );
  });
});

Deno.test("edge: a KV turn that lost its session cannot overwrite it; a dead turn's lease lapses", async () => {
  await withTwoKvStores({ leaseMs: 600 }, async (a, b, kv) => {
    const lease = ["t", "s", "lease"];
    const v1 = randomBytes(100_000);
    await a.set("s", v1);

    // The turn stalls past its lease and another process takes the session over
    // (simulated by writing that process's lease): its commit is refused.
    const stalled = (await a.begin("s"))!;
    await retryWhileBusy(() =>
      kv.set(lease, { owner: "another process", expiresAt: Date.now() + 60_000 })
    );
    await assertRejects(
      () => stalled.commit(randomBytes(100_000)),
      SessionConflictError,
      "Session s was continued by another request while this one was generating; " +
        "this reply was not saved",
    );
    assertEquals(await b.get("s"), v1);
    await retryWhileBusy(() => kv.delete(lease));
    await assertSessionClean(kv, "t", "s");

    // A save the turn did not begin from (here a plain set) also fences it off.
    const overtaken = (await a.begin("s"))!;
    const v2 = randomBytes(90_000);
    await b.set("s", v2);
    await assertRejects(() => overtaken.commit(randomBytes(90_000)), SessionConflictError);
    assertEquals(await a.get("s"), v2);
    assertEquals(a.stats().conflicts, 2);
    await assertSessionClean(kv, "t", "s");

    // A lease left by a process that died blocks the session only until it lapses.
    await retryWhileBusy(() =>
      kv.set(lease, { owner: "a dead process", expiresAt: Date.now() + 300 }, { expireIn: 300 })
    );
    await assertRejects(() => b.begin("s"), SessionBusyError);
    await delay(350);
    const taken = (await b.begin("s"))!;
    assertEquals(taken.snapshot, v2);
    // A live turn renews its lease (every 200 ms here), so it outlasts 600 ms.
    await delay(1300);
    await assertRejects(() => a.begin("s"), SessionBusyError);
    const v3 = randomBytes(80_000);
    await taken.commit(v3);
    assertEquals(await a.get("s"), v3);
    await assertSessionClean(kv, "t", "s");
  });
});

/**
 * A process contending for session "s" of the KV file at `path` for `ms`:
 * each turn reads a counter from the snapshot and commits it plus one.
 * Prints its counts as JSON.
 */
const CONTENDER = `
import { KvSessionStore, openKv, SessionBusyError } from ${
  JSON.stringify(new URL("../examples/edge/store.ts", import.meta.url).href)
};
const [path, ms] = Deno.args;
const kv = await openKv(path);
const store = new KvSessionStore(kv);
const counts = { commits: 0, busy: 0, errors: [] };
for (const end = Date.now() + Number(ms); Date.now() < end;) {
  try {
    const turn = await store.begin("s");
    const count = new DataView(turn.snapshot.buffer, turn.snapshot.byteOffset).getUint32(0, true);
    await new Promise((resolve) => setTimeout(resolve, Math.random() * 4));
    const next = new Uint8Array(70_000 + (count % 5) * 1000);
    new DataView(next.buffer).setUint32(0, count + 1, true);
    await turn.commit(next);
    counts.commits++;
  } catch (error) {
    if (error instanceof SessionBusyError) counts.busy++;
    else counts.errors.push(String(error));
  }
}
kv.close();
console.log(JSON.stringify(counts));
`;

Deno.test("edge: three processes contending for one KV session lose no update", async () => {
  await withTempKv(async (kv, path) => {
    const store = new KvSessionStore(kv);
    await store.set("s", new Uint8Array(70_000));
    const outputs = await Promise.all([0, 1, 2].map(() =>
      new Deno.Command(Deno.execPath(), {
        args: ["eval", "--ext=ts", "--unstable-kv", CONTENDER, path, "2000"],
        stdin: "null",
        stdout: "piped",
        stderr: "inherit",
        signal: AbortSignal.timeout(60_000),
      }).output()
    ));
    const counts = outputs.map((output) => {
      assertEquals(output.code, 0);
      return JSON.parse(new TextDecoder().decode(output.stdout));
    });
    for (const { errors } of counts) assertEquals(errors, []);
    const commits = counts.reduce((sum, { commits }) => sum + commits, 0);
    const snapshot = (await new KvSessionStore(kv, { cacheBytes: 0 }).get("s"))!;
    // Every commit counted once: no two turns began from the same state.
    assertEquals(new DataView(snapshot.buffer).getUint32(0, true), commits);
    // They did contend: turns were refused while another process held the session.
    assert(commits > 0 && counts.some((c) => c.busy > 0), JSON.stringify(counts));
    await assertSessionClean(kv, "mamba-sessions", "s");
    console.log(`3 processes, 2 s: ${commits} turns, ${counts.map((c) => c.busy)} refused`);
  });
});

/** The tiny-shakespeare reference: each sample's prompt ids and 48 greedy ids (HF transformers). */
const REFERENCE = await (async () => {
  const dir = `${SHARED}/models/tiny-shakespeare`;
  const expected = SafetensorsFile.parse(await Deno.readFile(`${dir}/expected.safetensors`), dir);
  return SAMPLES.map((sample, i) => ({
    ...sample,
    promptIds: [...expected.int32(`prompt${i}_ids`)],
    greedyIds: [...expected.int32(`prompt${i}_greedy_ids`)].slice(-48),
  }));
})();

Deno.test("edge: a reply whose KV session was taken over meanwhile ends in a 409 error and is not saved", async () => {
  await withTempKv(async (kv) => {
    await withServer({ sessions: new KvSessionStore(kv) }, async (base) => {
      const sample = REFERENCE[2];
      const first = await generate(base, {
        prompt: sample.prompt,
        max_new_tokens: 8,
        temperature: 0,
        session: "new",
      });
      const id = first.done.session;
      const lease = ["mamba-sessions", id, "lease"];
      // Another process takes the session over while the reply generates, as if
      // this one had stalled past its lease (simulated by writing that lease).
      const takeOver = () =>
        retryWhileBusy(() =>
          kv.set(lease, { owner: "another process", expiresAt: Date.now() + 60_000 })
        );
      const body = { prompt: "", max_new_tokens: 400, ignore_eos: true, session: id };

      const streamed = await post(base, "/v1/generate", body);
      assertEquals(streamed.status, 200);
      const events = readSse(streamed);
      assertEquals((await events.next()).value?.event, "message");
      await takeOver();
      let last: SseEvent | undefined;
      for await (const event of events) last = event;
      const conflict = `Session ${id} was continued by another request while this one ` +
        "was generating; this reply was not saved";
      assertEquals(last, { event: "error", data: JSON.stringify({ error: conflict }) });
      await retryWhileBusy(() => kv.delete(lease));
      const { sessions: before } = await waitForStats(base, (s) => s.active === 0);

      const whole = post(base, "/v1/generate", { ...body, stream: false });
      // Once its turn has begun (it holds the lease), not merely once it has arrived.
      await waitForStats(base, (s) => s.sessions!.turns === before!.turns + 1);
      await takeOver();
      const refused = await whole;
      assertEquals(refused.status, 409);
      assertEquals(await refused.json(), { error: conflict });
      await retryWhileBusy(() => kv.delete(lease));

      // Neither reply was saved: the session continues from its first turn.
      const next = await generate(base, {
        prompt: "",
        max_new_tokens: 8,
        temperature: 0,
        session: id,
      });
      assertEquals([...first.tokens, ...next.tokens], sample.greedyIds.slice(0, 16));
      const { failed, sessions } = await stats(base);
      assertEquals([failed, sessions.conflicts], [2, 2]);
      await assertSessionClean(kv, "mamba-sessions", id);
    });
  });
});

const MAIN = new URL("../examples/edge/main.ts", import.meta.url).pathname;
const CONFIG = new URL("../deno.json", import.meta.url).pathname;

/** A server process of examples/edge/main.ts. */
interface ServerProcess {
  base: string;
  /** Signals it (SIGTERM unless said) and waits until it has exited. */
  stop(signal?: Deno.Signal): Promise<void>;
  /** What it printed on stderr so far. */
  log(): string;
}

/** Starts examples/edge/main.ts on a free port of 127.0.0.1; resolves once it listens. */
async function spawnServer(
  env: Record<string, string>,
  signal: AbortSignal,
): Promise<ServerProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      `--config=${CONFIG}`,
      "--allow-net=127.0.0.1",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      MAIN,
    ],
    env: {
      MAMBA_MODEL: `${SHARED}/models/tiny-shakespeare`,
      MAMBA_BACKEND: "wasm",
      MAMBA_THREADS: "1",
      MAMBA_HOST: "127.0.0.1",
      PORT: "0",
      NO_COLOR: "1",
      ...env,
    },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let log = "";
  const port = Promise.withResolvers<string>();
  // Reads stderr to its end (the process's), watching for the "Serving" line.
  const drained = (async () => {
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      log += text;
      const found = /on http:\/\/127\.0\.0\.1:(\d+)\//.exec(log)?.[1];
      if (found) port.resolve(found);
    }
    port.reject(new Error(`The server exited before listening:\n${log}`));
  })();
  const stop = async (kill: Deno.Signal = "SIGTERM") => {
    try {
      child.kill(kill);
    } catch {
      // Exited already.
    }
    await child.status;
    await drained;
  };
  const aborted = new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
  try {
    return {
      base: `http://127.0.0.1:${await Promise.race([port.promise, aborted])}`,
      stop,
      log: () => log,
    };
  } catch (error) {
    await stop("SIGKILL");
    throw error;
  }
}

/**
 * Runs `body` with two server processes (A and B) on one new KV database
 * file, `env` added to their environment; `body`'s requests take `signal`,
 * which aborts after `deadlineMs`. The processes and the database's files
 * are removed afterwards, whatever happened.
 */
async function withTwoServers(
  env: Record<string, string>,
  body: (a: ServerProcess, b: ServerProcess, kvPath: string, signal: AbortSignal) => Promise<void>,
  deadlineMs = 120_000,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "mamba-edge-scale-" });
  const kvPath = `${dir}/sessions.kv`;
  const servers: ServerProcess[] = [];
  const deadline = new AbortController();
  const timer = setTimeout(
    () => deadline.abort(new Error(`The test ran past its ${deadlineMs} ms deadline`)),
    deadlineMs,
  );
  try {
    const serverEnv = { MAMBA_SESSION_STORE: "kv", MAMBA_KV_PATH: kvPath, ...env };
    const started = await Promise.allSettled(
      [0, 1].map(() => spawnServer(serverEnv, deadline.signal)),
    );
    for (const result of started) if (result.status === "fulfilled") servers.push(result.value);
    for (const result of started) if (result.status === "rejected") throw result.reason;
    try {
      await body(servers[0], servers[1], kvPath, deadline.signal);
    } catch (error) {
      for (const [i, server] of servers.entries()) {
        console.error(`--- server ${"AB"[i]} stderr ---\n${server.log()}`);
      }
      throw error;
    }
  } finally {
    clearTimeout(timer);
    await Promise.all(servers.map((server) => server.stop()));
    await Deno.remove(dir, { recursive: true });
  }
}

/** GET /v1/stats of a server process. */
async function processStats(server: ServerProcess, signal: AbortSignal) {
  return await (await fetch(`${server.base}/v1/stats`, { signal })).json();
}

Deno.test("edge scale-out: two server processes on one KV database serve a conversation alternately, as the reference", async () => {
  await withTwoServers({}, async (a, b, kvPath, signal) => {
    // Each conversation: A starts it, B continues, A continues twice (12 tokens a turn).
    const turns = [a, b, a, a];
    for (const sample of REFERENCE) {
      const outputs: Streamed[] = [];
      for (const [i, server] of turns.entries()) {
        outputs.push(
          await generate(server.base, {
            prompt: i === 0 ? sample.prompt : "",
            max_new_tokens: 12,
            temperature: 0,
            session: i === 0 ? "new" : outputs[0].done.session,
          }, { signal }),
        );
      }
      assertEquals(outputs[0].done.prompt_tokens, sample.promptIds.length);
      assertEquals(outputs.map((o) => o.done.session), Array(4).fill(outputs[0].done.session));
      const tokens = outputs.flatMap((o) => o.tokens);
      const text = outputs.map((o) => o.text).join("");
      // Against the reference data (HF transformers' greedy ids and text) ...
      assertEquals(tokens, sample.greedyIds, sample.prompt);
      assertEquals(sample.prompt + text, sample.greedy_text);
      // ... and against one uninterrupted run of the same length.
      const whole = await generate(b.base, {
        prompt: sample.prompt,
        max_new_tokens: 48,
        temperature: 0,
      }, { signal });
      assertEquals(tokens, whole.tokens);
    }
    // Turn 3 of each conversation found A's cached snapshot (of turn 1) stale
    // against KV and read KV; turn 4 found it current.
    const [statsA, statsB] = [await processStats(a, signal), await processStats(b, signal)];
    const n = REFERENCE.length;
    assertEquals(statsA.sessions.cacheMisses, n);
    assertEquals(statsA.sessions.cacheHits, n);
    assertEquals(statsB.sessions.cacheMisses, n);
    assertEquals(statsB.sessions.cacheHits, 0);
    assertEquals(statsA.sessions.turns + statsB.sessions.turns, 3 * n);
    assertEquals(statsA.sessions.conflicts + statsB.sessions.conflicts, 0);

    // The database holds each session whole, with no lease left.
    const kv = await openKv(kvPath);
    try {
      const entries = await retryWhileBusy(() =>
        Array.fromAsync(kv.list({ prefix: ["mamba-sessions"] }))
      );
      const ids = [...new Set(entries.map((entry) => entry.key[1] as string))];
      assertEquals(ids.length, n);
      for (const id of ids) await assertSessionClean(kv, "mamba-sessions", id);
    } finally {
      kv.close();
    }
  });
});

Deno.test("edge scale-out: simultaneous continues of one session on two processes: one runs, one gets 409", async () => {
  await withTwoServers({}, async (a, b, kvPath, signal) => {
    const sample = REFERENCE[0];
    const first = await generate(a.base, {
      prompt: sample.prompt,
      max_new_tokens: 8,
      temperature: 0,
      session: "new",
    }, { signal });
    const id = first.done.session;

    // Both at once, long enough (200 tokens) that they overlap.
    const body = { prompt: "", max_new_tokens: 200, temperature: 0, ignore_eos: true, session: id };
    const responses = await Promise.all(
      [a, b].map((server) => post(server.base, "/v1/generate", body, { signal })),
    );
    const statuses = responses.map((r) => r.status);
    assertEquals([...statuses].sort(), [200, 409], `statuses ${statuses}`);
    const winner = statuses.indexOf(200);
    const [running, refused] = [responses[winner], responses[1 - winner]];
    assertEquals((await refused.json()).error, `Session ${id} is generating a reply already`);
    const events = readSse(running);
    const opening = (await events.next()).value;
    assertEquals(opening?.event, "message");
    const secondTokens: number[] = [JSON.parse(opening!.data).token];
    // While it runs, the session is refused on either process, and cannot be deleted.
    for (const server of [a, b]) {
      const again = await post(server.base, "/v1/generate", body, { signal });
      assertEquals(again.status, 409);
      assertEquals((await again.json()).error, `Session ${id} is generating a reply already`);
      const deleted = await fetch(`${server.base}/v1/sessions/${id}`, {
        method: "DELETE",
        signal,
      });
      assertEquals(deleted.status, 409);
      await deleted.body?.cancel();
    }
    for await (const { event, data } of events) {
      if (event === "message") secondTokens.push(JSON.parse(data).token);
    }
    assertEquals(secondTokens.length, 200);

    // The session holds exactly the winner's turn: the loser's process continues it.
    const loser = [a, b][1 - winner];
    const third = await generate(loser.base, {
      prompt: "",
      max_new_tokens: 16,
      temperature: 0,
      ignore_eos: true,
      session: id,
    }, { signal });
    const tokens = [...first.tokens, ...secondTokens, ...third.tokens];
    const uninterrupted: number[] = [];
    const options = { maxNewTokens: tokens.length, temperature: 0, ignoreEos: true };
    for await (const event of model.generate(sample.prompt, options)) {
      uninterrupted.push(event.token);
    }
    assertEquals(tokens, uninterrupted);
    assertEquals(tokens.slice(0, 48), sample.greedyIds);

    const [statsA, statsB] = [await processStats(a, signal), await processStats(b, signal)];
    assertEquals(statsA.sessions.busy + statsB.sessions.busy, 5); // The race, 2 continues, 2 deletes.
    assertEquals(statsA.sessions.conflicts + statsB.sessions.conflicts, 0);
    const kv = await openKv(kvPath);
    try {
      await assertSessionClean(kv, "mamba-sessions", id);
    } finally {
      kv.close();
    }
  });
});

Deno.test("edge scale-out: a process killed in the middle of a reply blocks its session only until the lease lapses", async () => {
  const leaseSeconds = 2;
  await withTwoServers(
    { MAMBA_SESSION_LEASE_SECONDS: String(leaseSeconds) },
    async (a, b, kvPath, signal) => {
      const sample = REFERENCE[1];
      const first = await generate(a.base, {
        prompt: sample.prompt,
        max_new_tokens: 8,
        temperature: 0,
        session: "new",
      }, { signal });
      const id = first.done.session;

      // A long reply on A, and A dies (SIGKILL: no cleanup) after its first token.
      const dying = await post(a.base, "/v1/generate", {
        prompt: "",
        max_new_tokens: 1000,
        ignore_eos: true,
        temperature: 0,
        session: id,
      }, { signal });
      const events = readSse(dying);
      assertEquals((await events.next()).value?.event, "message");
      await a.stop("SIGKILL");
      const killed = performance.now();
      await events.return(undefined).catch(() => {});

      // Its lease is still live: B refuses the session ...
      const refused = await post(b.base, "/v1/generate", { prompt: "", session: id }, { signal });
      assertEquals(refused.status, 409);
      assertEquals((await refused.json()).error, `Session ${id} is generating a reply already`);
      // ... until it lapses, and then continues it from its last saved state.
      let continued: Response;
      for (;;) {
        continued = await post(b.base, "/v1/generate", {
          prompt: "",
          max_new_tokens: 16,
          temperature: 0,
          session: id,
        }, { signal });
        if (continued.status !== 409) break;
        await continued.body?.cancel();
        await delay(100);
      }
      const waited = performance.now() - killed;
      assertEquals(continued.status, 200);
      assert(waited < (leaseSeconds + 3) * 1000, `blocked for ${waited} ms`);
      const tokens = [...first.tokens];
      for await (const { event, data } of readSse(continued)) {
        if (event === "message") tokens.push(JSON.parse(data).token);
      }
      // The killed turn left no trace: 8 + 16 tokens, as the reference.
      assertEquals(tokens, sample.greedyIds.slice(0, 24));
      console.log(`session blocked for ${waited.toFixed(0)} ms after its process was killed`);
      const kv = await openKv(kvPath);
      try {
        await assertSessionClean(kv, "mamba-sessions", id);
      } finally {
        kv.close();
      }
    },
  );
});
