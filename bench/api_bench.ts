/**
 * What a user's code gets, through the public API only (`loadModel`,
 * `Mamba.generate`, `Session.prefill`), printed as one JSON object:
 *
 * - `auto`: the backend `loadModel(dir)` picks by default, with its report;
 * - `streams`: N concurrent `generate` calls (16-token prompts, 128 new
 *   tokens each, end-of-sequence ignored), greedy, total tok/s over the wall
 *   time of the whole batch (prompt included, as mamba_ssm's `generate` is
 *   timed), and each stream's time to its first token; one stream also
 *   sampled with llama.cpp's defaults (top-k 40, top-p 0.95, min-p 0.05,
 *   temperature 0.8);
 * - `prefill`: `session.prefill(ids)` of a 2048-token prompt, which returns
 *   the last logits to the host; one session alone, and (`--prefill-sessions`,
 *   default 5) that many sessions' prefills in flight at once, awaited
 *   together, as mamba_ssm's prefill is timed (five forward passes, then one
 *   synchronisation): the read-back's fixed wait is then paid once per batch;
 * - `http` (with `--http-streams`): the same greedy streams through the edge
 *   server (examples/edge, or `$MAMBA_EDGE_MAIN`) in a subprocess, over HTTP.
 *
 * Each figure is the best of `--reps` runs after one warm-up run of the same
 * shape (which compiles pipelines and records the decode rounds).
 *
 * ```sh
 * deno run -A bench/api_bench.ts --backend=wasm --streams=1,4,16
 * deno run -A bench/api_bench.ts --backend=webgpu --streams=1,16,64,256 --auto
 * ```
 *
 * The model is `--model=DIR` or `$MAMBA_BENCH_MODEL`, else a mamba-130m-shaped
 * one with random F32 weights written to a temp dir, with the tokenizer of
 * `--tokenizer=DIR` (default ../shared/tokenizers/gpt-neox-20b). On the GPU
 * machine it runs bundled (see ../shared/device/README.md).
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { formatBackendReport, loadModel, type Mamba } from "../mod.ts";
import type { BackendName } from "../src/backends/registry.ts";
import { median, startServer, timedStream } from "./edge_load.ts";
import { benchModelDir, promptIds, SAMPLED_OPTIONS, withTokenizer } from "./make_random_model.ts";

const flags = parseArgs(Deno.args, {
  string: [
    "backend",
    "model",
    "tokenizer",
    "streams",
    "tokens",
    "prompt",
    "prefill",
    "prefill-sessions",
    "reps",
    "http-streams",
  ],
  boolean: ["auto", "sampled"],
  default: {
    backend: "wasm",
    streams: "1,16",
    tokens: "128",
    prompt: "16",
    prefill: "2048",
    "prefill-sessions": "5",
    reps: "3",
    "http-streams": "",
    sampled: true,
  },
});
const TOKENS = Number(flags.tokens);
const PROMPT = Number(flags.prompt);
const REPS = Number(flags.reps);

/** The model directory, with a tokenizer; a GGUF file carries its own. */
async function modelDir(): Promise<string> {
  return withTokenizer(flags.model ?? await benchModelDir(), flags.tokenizer);
}

interface StreamsRun {
  wallMs: number;
  firstTokenMs: number[];
}

/** `streams` concurrent generations of TOKENS tokens from distinct prompts. */
async function runStreams(
  mamba: Mamba,
  streams: number,
  options: Record<string, number>,
): Promise<StreamsRun> {
  const vocab = mamba.tokenizer.vocabSize;
  const start = performance.now();
  const firstTokenMs = await Promise.all(Array.from({ length: streams }, async (_, i) => {
    const prompt = [...promptIds(PROMPT + i, vocab).subarray(i)];
    const generation = mamba.generate(prompt, {
      maxNewTokens: TOKENS,
      ignoreEos: true,
      seed: i + 1,
      ...options,
    });
    let first = 0;
    let count = 0;
    for await (const _ of generation) if (count++ === 0) first = performance.now() - start;
    if (count !== TOKENS) throw new Error(`Stream ${i} gave ${count} tokens, not ${TOKENS}`);
    generation.session.dispose();
    return first;
  }));
  return { wallMs: performance.now() - start, firstTokenMs };
}

/** The best of REPS runs after a warm-up. */
async function bestOf<T extends { wallMs: number }>(run: () => Promise<T>): Promise<T> {
  await run();
  let best: T | null = null;
  for (let i = 0; i < REPS; i++) {
    const result = await run();
    if (best === null || result.wallMs < best.wallMs) best = result;
  }
  return best!;
}

/** `streams` concurrent greedy requests of TOKENS tokens to the server at `base`. */
async function httpStreams(base: string, streams: number, prompts: string[]): Promise<StreamsRun> {
  const start = performance.now();
  const timings = await Promise.all(
    Array.from({ length: streams }, (_, i) => timedStream(base, prompts[i], i + 1, TOKENS, 0)),
  );
  for (const timing of timings) {
    if (timing.tokens !== TOKENS) throw new Error(`A stream gave ${timing.tokens} tokens`);
  }
  return { wallMs: performance.now() - start, firstTokenMs: timings.map((t) => t.firstTokenMs) };
}

/** Greedy streams through the edge server, run in a subprocess on `dir`. */
async function benchHttp(dir: string, backend: string, counts: number[], mamba: Mamba) {
  // Prompts of PROMPT tokens, as text: distinct per stream.
  const prompts = Array.from({ length: Math.max(...counts) }, (_, i) => {
    const ids = [...promptIds(PROMPT + i, mamba.tokenizer.vocabSize).subarray(i)];
    return mamba.tokenizer.decode(ids);
  });
  const server = await startServer(dir, {
    MAMBA_BACKEND: backend,
    MAMBA_MAX_CONCURRENT: String(Math.max(...counts)),
  });
  try {
    const results: Record<string, unknown>[] = [];
    for (const count of counts) {
      const best = await bestOf(() => httpStreams(server.base, count, prompts));
      results.push({
        streams: count,
        totalTokPerS: round1(count * TOKENS / (best.wallMs / 1000)),
        wallMs: round1(best.wallMs),
        firstTokenMsMedian: round1(median(best.firstTokenMs)),
        firstTokenMsMax: round1(Math.max(...best.firstTokenMs)),
      });
      console.error(JSON.stringify({ http: results.at(-1) }));
    }
    return results;
  } finally {
    await server.stop();
  }
}

const round1 = (x: number) => Math.round(x * 10) / 10;

async function main(): Promise<void> {
  const dir = await modelDir();
  const report: Record<string, unknown> = { model: dir, tokens: TOKENS, promptTokens: PROMPT };
  if (flags.auto) {
    const start = performance.now();
    const auto = await loadModel(dir, { backend: "auto", remeasure: true });
    report.auto = {
      picked: auto.backend,
      loadMs: Math.round(performance.now() - start),
      report: formatBackendReport(auto.backendReport()),
    };
    auto.model.backend.dispose();
    console.error(JSON.stringify(report.auto));
  }
  const mamba = await loadModel(dir, { backend: flags.backend as BackendName });
  report.backend = mamba.backend;
  const streams: Record<string, unknown>[] = [];
  for (const count of flags.streams.split(",").map(Number)) {
    const modes = count === 1 && flags.sampled ? ["greedy", "sampled"] : ["greedy"];
    for (const mode of modes) {
      const options = mode === "greedy" ? { temperature: 0 } : SAMPLED_OPTIONS;
      const best = await bestOf(() => runStreams(mamba, count, options));
      streams.push({
        streams: count,
        mode,
        totalTokPerS: round1(count * TOKENS / (best.wallMs / 1000)),
        wallMs: round1(best.wallMs),
        firstTokenMsMedian: round1(median(best.firstTokenMs)),
        firstTokenMsMax: round1(Math.max(...best.firstTokenMs)),
      });
      console.error(JSON.stringify(streams.at(-1)));
    }
  }
  report.streams = streams;
  const prefillTokens = Number(flags.prefill);
  if (prefillTokens > 0) {
    const ids = promptIds(prefillTokens, mamba.tokenizer.vocabSize);
    const prefills = (sessions: number) =>
      bestOf(async () => {
        const all = Array.from({ length: sessions }, () => mamba.session());
        const start = performance.now();
        const logits = await Promise.all(
          all.map((session, i) => session.prefill(ids.map((id) => (id + i) % mamba.vocabSize))),
        );
        const wallMs = performance.now() - start;
        if (logits.some((row) => row.length !== mamba.vocabSize)) {
          throw new Error("Prefill gave no logits");
        }
        for (const session of all) session.dispose();
        return { wallMs };
      });
    const alone = await prefills(1);
    report.prefill = {
      tokens: prefillTokens,
      tokPerS: Math.round(prefillTokens / (alone.wallMs / 1000)),
      wallMs: round1(alone.wallMs),
    };
    console.error(JSON.stringify(report.prefill));
    const sessions = Number(flags["prefill-sessions"]);
    if (sessions > 1) {
      const together = await prefills(sessions);
      report.prefillInFlight = {
        sessions,
        tokens: prefillTokens,
        totalTokPerS: Math.round(sessions * prefillTokens / (together.wallMs / 1000)),
        wallMs: round1(together.wallMs),
      };
      console.error(JSON.stringify(report.prefillInFlight));
    }
  }
  const httpCounts = flags["http-streams"].split(",").filter(Boolean).map(Number);
  if (httpCounts.length > 0) report.http = await benchHttp(dir, mamba.backend, httpCounts, mamba);
  mamba.model.backend.dispose();
  console.log(JSON.stringify(report, null, 2));
}

if (import.meta.main) await main();
