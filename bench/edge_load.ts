/**
 * Load test of the edge server (examples/edge): latency to the first token
 * and tokens/s per stream at several numbers of concurrent streams, and the
 * cost of saving and restoring a session snapshot.
 *
 * ```sh
 * ../shared/jsr/with-jsr.sh deno task bench:edge [model dir ...]
 * ```
 *
 * Each model (default: the bundled tiny-shakespeare; pass a directory such as
 * the output of `deno task make-random-model /tmp/rand130m` for the 130m
 * shape) is served by `examples/edge/main.ts` in a subprocess, so the server
 * has its own thread as it would in production; this process is the clients.
 * Every stream sends its own prompt, samples with its own seed and ignores
 * end-of-sequence, so all generate the same number of tokens. The prefix
 * cache is off so that every request prefills its prompt.
 *
 * Environment: `MAMBA_BACKEND` (default wasm), `MAMBA_THREADS` (default 1),
 * `BENCH_STREAMS` (default "1,8,50"), `BENCH_TOKENS` (new tokens per stream,
 * default 32), `BENCH_SNAPSHOT_REPS` (default 5).
 *
 * @module
 */

import { loadModel, type Mamba } from "../mod.ts";
import { KvSessionStore, MemorySessionStore, type SessionStore } from "../examples/edge/store.ts";

const BACKEND = Deno.env.get("MAMBA_BACKEND") || "wasm";
const THREADS = Deno.env.get("MAMBA_THREADS") || "1";
const STREAMS = (Deno.env.get("BENCH_STREAMS") || "1,8,50").split(",").map(Number);
const TOKENS = Number(Deno.env.get("BENCH_TOKENS") || 32);
const SNAPSHOT_REPS = Number(Deno.env.get("BENCH_SNAPSHOT_REPS") || 5);
/** The server's entry point; `MAMBA_EDGE_MAIN` names another (a bundle of it, on a machine without network). */
const MAIN = Deno.env.get("MAMBA_EDGE_MAIN") ||
  new URL("../examples/edge/main.ts", import.meta.url).pathname;
const PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed"];

/** A running server. */
export interface Server {
  base: string;
  stop(): Promise<void>;
}

/**
 * Starts examples/edge/main.ts on a free port and waits for its "Serving"
 * line; `env` adds to or overrides its environment.
 */
export async function startServer(
  model: string,
  env: Record<string, string> = {},
): Promise<Server> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-read", "--allow-env", "--allow-write", MAIN],
    env: {
      MAMBA_MODEL: model,
      MAMBA_BACKEND: BACKEND,
      MAMBA_THREADS: THREADS,
      MAMBA_MAX_CONCURRENT: "64",
      MAMBA_PREFIX_CACHE_MB: "0",
      MAMBA_HOST: "127.0.0.1",
      PORT: "0",
      ...env,
    },
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
  let seen = "";
  const lines = child.stderr.pipeThrough(new TextDecoderStream());
  const reader = lines.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`The server exited before listening:\n${seen}`);
    seen += value;
    const port = /on http:\/\/127\.0\.0\.1:(\d+)\//.exec(seen)?.[1];
    if (port) {
      reader.releaseLock();
      lines.pipeTo(new WritableStream()).catch(() => {}); // Keep draining its stderr.
      return {
        base: `http://127.0.0.1:${port}`,
        async stop() {
          child.kill();
          await child.status;
        },
      };
    }
  }
}

/** What one streamed request saw. */
export interface StreamTiming {
  firstTokenMs: number;
  tokens: number;
  /** Decode rate seen by the client: tokens after the first over the time they took. */
  tokensPerSecond: number;
}

/**
 * One streamed request, timed from the moment it is sent: `tokens` new
 * tokens (end-of-sequence ignored), sampled with `seed` at `temperature`.
 */
export async function timedStream(
  base: string,
  prompt: string,
  seed: number,
  tokens = TOKENS,
  temperature = 0.8,
): Promise<StreamTiming> {
  const start = performance.now();
  const response = await fetch(`${base}/v1/generate`, {
    method: "POST",
    body: JSON.stringify({
      prompt,
      max_new_tokens: tokens,
      temperature,
      seed,
      ignore_eos: true,
    }),
  });
  if (response.status !== 200) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  let first = 0;
  let last = 0;
  let received = 0;
  let buffer = "";
  for await (const text of response.body!.pipeThrough(new TextDecoderStream())) {
    buffer += text;
    const events = buffer.split("\n\n");
    buffer = events.pop()!;
    for (const event of events) {
      if (!event.startsWith("data: ")) continue; // The final "event: done".
      last = performance.now();
      if (received++ === 0) first = last;
    }
  }
  return {
    firstTokenMs: first - start,
    tokens: received,
    tokensPerSecond: received > 1 ? (received - 1) / ((last - first) / 1000) : 0,
  };
}

/** The middle value. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

async function loadTest(model: string): Promise<void> {
  const server = await startServer(model);
  try {
    await timedStream(server.base, PROMPTS[0], 0); // Warm-up: compile and tier up.
    console.log(`\n${model} (backend ${BACKEND}, ${THREADS} thread(s)), ${TOKENS} new tokens`);
    console.log(
      "streams | first token median / max (ms) | tok/s per stream (median) | tok/s total",
    );
    for (const streams of STREAMS) {
      const start = performance.now();
      const timings = await Promise.all(
        Array.from(
          { length: streams },
          (_, i) => timedStream(server.base, `${PROMPTS[i % PROMPTS.length]} ${i}`, i + 1),
        ),
      );
      const wall = (performance.now() - start) / 1000;
      const total = timings.reduce((sum, t) => sum + t.tokens, 0);
      const ttft = timings.map((t) => t.firstTokenMs);
      console.log(
        `${String(streams).padStart(7)} | ${median(ttft).toFixed(0).padStart(13)} / ${
          Math.max(...ttft).toFixed(0).padEnd(14)
        } | ${median(timings.map((t) => t.tokensPerSecond)).toFixed(1).padStart(25)} | ${
          (total / wall).toFixed(1).padStart(11)
        }`,
      );
    }
  } finally {
    await server.stop();
  }
}

/** Median milliseconds of `reps` runs of `task`. */
async function time(reps: number, task: () => unknown): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < reps; i++) {
    const start = performance.now();
    await task();
    samples.push(performance.now() - start);
  }
  return median(samples);
}

/** Snapshot size, and the save and restore paths of the server, per store. */
async function snapshotCosts(modelDir: string): Promise<void> {
  const model: Mamba = await loadModel(modelDir, {
    backend: BACKEND as "wasm",
    threads: Number(THREADS),
  });
  const session = model.session();
  await session.prefill(model.tokenizer.encode(PROMPTS[2]));
  const snapshot = await session.snapshot();
  const kvPath = await Deno.makeTempFile({ suffix: ".kv" });
  const kv = await Deno.openKv(kvPath);
  try {
    console.log(`\nsnapshot of ${modelDir}: ${snapshot.byteLength} bytes`);
    console.log(
      `  session.snapshot(): ${
        (await time(SNAPSHOT_REPS, () => session.snapshot())).toFixed(2)
      } ms`,
    );
    console.log(
      `  model.session(bytes) (restore): ${
        (await time(SNAPSHOT_REPS, () => model.session(snapshot).dispose())).toFixed(2)
      } ms`,
    );
    const stores: [string, SessionStore][] = [
      ["memory", new MemorySessionStore()],
      ["Deno KV (file)", new KvSessionStore(kv)],
    ];
    for (const [name, store] of stores) {
      const save = await time(SNAPSHOT_REPS, async () => store.set("s", await session.snapshot()));
      const restore = await time(SNAPSHOT_REPS, async () => {
        model.session((await store.get("s"))!).dispose();
      });
      console.log(
        `  ${name}: save (snapshot + set) ${save.toFixed(2)} ms, ` +
          `restore (get + model.session) ${restore.toFixed(2)} ms`,
      );
    }
  } finally {
    session.dispose();
    kv.close();
    await Deno.remove(kvPath);
  }
}

if (import.meta.main) {
  const models = Deno.args.length > 0
    ? Deno.args
    : [new URL("../models/tiny-shakespeare/", import.meta.url).pathname];
  for (const model of models) {
    await loadTest(model);
    await snapshotCosts(model);
  }
}
