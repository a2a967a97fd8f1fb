/**
 * What `deno task bench` runs: the speed a user's code gets, through the
 * public API only (`loadModel`, `Session.prefill`, `Mamba.generate`), on every
 * backend that is real on this machine, in a couple of minutes.
 *
 * The model is `$MAMBA_BENCH_MODEL` (a directory, URL, Hugging Face repo id
 * or `.gguf` file, passed to `loadModel` as given), else the bundled
 * tiny-shakespeare model. Groups, one line per backend in each:
 *
 * - `prefill`: `session.prefill` of a PREFILL-token prompt (tok/s = PREFILL /
 *   time);
 * - `decode, 1 stream`: one `generate` call of DECODE new tokens;
 * - `decode, N streams`: N concurrent `generate` calls of DECODE tokens each,
 *   batched by the decode engine (tok/s = N × DECODE / time);
 * - `first token`: a `generate` call's wait for its first token after a
 *   FIRST_TOKEN_PROMPT-token prompt.
 *
 * A software WebGPU adapter (llvmpipe, SwiftShader, a fallback adapter) is
 * skipped unless `MAMBA_BENCH_SOFTWARE_GPU=1`, and the js reference backend on
 * a model of more than 20 M parameters; `MAMBA_BENCH_BACKENDS=js,wasm` picks
 * backends (those named always run). Peak resident memory is printed after each backend loads
 * and once at the end, with a summary table: each backend's median
 * iteration per measure and the fastest backend for each.
 *
 * @module
 */

import { loadModel, type Mamba } from "../mod.ts";
import type { BackendName } from "../mod.ts";
import { promptIds } from "./make_random_model.ts";

/** Prompt tokens for the prefill and first-token benches. */
const PREFILL = 256;
/** Prompt tokens for the first-token bench: a chat turn's length. */
const FIRST_TOKEN_PROMPT = 64;
/** New tokens per stream in the decode benches. */
const DECODE = 32;
/** Concurrent streams in the batched decode bench. */
const STREAMS = 8;

const source = Deno.env.get("MAMBA_BENCH_MODEL") ??
  new URL("../models/tiny-shakespeare/", import.meta.url);
const requested = Deno.env.get("MAMBA_BENCH_BACKENDS")?.split(",").map((name) => name.trim());

/** Resident memory figures of this process, in MB (Linux; null elsewhere). */
function residentMb(): { peak: number; now: number } | null {
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const mb = (key: string) =>
      Math.round(Number(status.match(new RegExp(`${key}:\\s+(\\d+)`))?.[1]) / 1024);
    return { peak: mb("VmHWM"), now: mb("VmRSS") };
  } catch {
    return null;
  }
}

/** Why the WebGPU backend is left out, or null when it runs on real hardware. */
async function webgpuSkipReason(): Promise<string | null> {
  if (!("gpu" in navigator)) return "no WebGPU in this Deno";
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return "no WebGPU adapter";
  const info = adapter.info;
  const text = `${info.vendor} ${info.architecture} ${info.device} ${info.description}`;
  const software = info.isFallbackAdapter || /llvmpipe|lavapipe|swiftshader|software/i.test(text);
  if (!software || Deno.env.get("MAMBA_BENCH_SOFTWARE_GPU") === "1") return null;
  return `the adapter is a software one (${info.description || info.device || info.vendor}); ` +
    "MAMBA_BENCH_SOFTWARE_GPU=1 includes it (minutes per bench)";
}

const candidates: BackendName[] = ["wasm", "webgpu", "js"];
const backends: BackendName[] = [];
for (const name of candidates) {
  if (requested && !requested.includes(name)) continue;
  if (name === "webgpu") {
    const reason = await webgpuSkipReason();
    if (reason !== null) {
      console.error(`webgpu: skipped, ${reason}`);
      continue;
    }
  }
  backends.push(name);
}

/** Drains `count` concurrent generations of DECODE tokens from PROMPT-token prompts. */
async function generateStreams(mamba: Mamba, count: number, promptTokens: number) {
  await Promise.all(Array.from({ length: count }, async (_, i) => {
    const prompt = [...promptIds(promptTokens + i, mamba.vocabSize).subarray(i)];
    const generation = mamba.generate(prompt, {
      maxNewTokens: DECODE,
      ignoreEos: true,
      temperature: 0,
    });
    let tokens = 0;
    for await (const _ of generation) tokens++;
    generation.session.dispose();
    if (tokens !== DECODE) throw new Error(`Stream ${i} gave ${tokens} tokens, not ${DECODE}`);
  }));
}

/**
 * Parameters above which the js reference backend is left out unless named in
 * MAMBA_BENCH_BACKENDS: on a 130m model its benches take minutes each.
 */
const JS_MAX_PARAMETERS = 20e6;

/** The matrices' parameters, roughly: embedding, in_proj and out_proj. */
function parametersOf(mamba: Mamba): number {
  const { vocabSize, dModel, dInner, nLayer } = mamba.model.config;
  return vocabSize * dModel + nLayer * 3 * dModel * dInner;
}

type Measure = "prefill" | "decode1" | "decodeN" | "firstToken";
/** Each backend's iteration times per measure (ms), for the summary printed at the end. */
const times = new Map<string, number[]>();

/** `run`, its time of every iteration recorded under `backend` and `measure`. */
function timed(backend: string, measure: Measure, run: () => Promise<void>): () => Promise<void> {
  return async () => {
    const start = performance.now();
    await run();
    const key = `${backend} ${measure}`;
    times.set(key, [...times.get(key) ?? [], performance.now() - start]);
  };
}

function median(values: number[]): number {
  const sorted = values.toSorted((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/**
 * What to conclude, in one table: each backend's tok/s (median iteration)
 * and its wait for a first token, and the fastest backend for each.
 */
function summary(): string {
  const measures: [Measure, string, (ms: number) => number][] = [
    ["prefill", `prefill ${PREFILL}, tok/s`, (ms) => PREFILL / ms * 1000],
    ["decode1", "decode 1 stream, tok/s", (ms) => DECODE / ms * 1000],
    ["decodeN", `decode ${STREAMS} streams, tok/s`, (ms) => STREAMS * DECODE / ms * 1000],
    ["firstToken", "first token, ms", (ms) => ms],
  ];
  const ran = backends.filter((backend) => times.has(`${backend} prefill`));
  if (ran.length === 0) return "";
  const rows = measures.map(([measure, label, value]) => {
    const figures = ran.map((backend) =>
      value(median(times.get(`${backend} ${measure}`) ?? [NaN]))
    );
    const best = measure === "firstToken" ? Math.min(...figures) : Math.max(...figures);
    const fastest = ran[figures.indexOf(best)];
    return [label, ...figures.map((f) => f.toFixed(1)), ran.length > 1 ? fastest : ""];
  });
  const header = ["", ...ran, ran.length > 1 ? "fastest" : ""];
  const widths = header.map((_, i) => Math.max(...[header, ...rows].map((row) => row[i].length)));
  const line = (row: string[]) => row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd();
  return [`summary for ${source} (median iteration):`, line(header), ...rows.map(line)].join("\n");
}

let parameters = 0;
for (const backend of backends) {
  if (backend === "js" && !requested && parameters > JS_MAX_PARAMETERS) {
    console.error(
      `js: skipped, the reference backend takes minutes per bench on a model of ` +
        `${(parameters / 1e6).toFixed(0)} M parameters; MAMBA_BENCH_BACKENDS=wasm,js includes it`,
    );
    continue;
  }
  const start = performance.now();
  const mamba = await loadModel(source, { backend });
  parameters = parametersOf(mamba);
  const memory = residentMb();
  console.error(
    `${backend}: loaded ${source} in ${((performance.now() - start) / 1000).toFixed(1)} s` +
      (memory ? `, peak resident memory so far ${memory.peak} MB` : ""),
  );
  // The reference backend runs fewer iterations: it is there to show the gap.
  const n = backend === "js" ? 2 : 5;
  const prompt = promptIds(PREFILL, mamba.vocabSize);
  Deno.bench({
    name: `${backend}: prefill ${PREFILL} tokens`,
    group: "prefill",
    n,
    warmup: 1,
    fn: timed(backend, "prefill", async () => {
      const session = mamba.session();
      await session.prefill(prompt);
      session.dispose();
    }),
  });
  Deno.bench({
    name: `${backend}: decode ${DECODE} tokens, 1 stream`,
    group: "decode, 1 stream",
    n,
    warmup: 1,
    fn: timed(backend, "decode1", () => generateStreams(mamba, 1, 4)),
  });
  Deno.bench({
    name: `${backend}: decode ${DECODE} tokens x ${STREAMS} streams`,
    group: `decode, ${STREAMS} streams`,
    n,
    warmup: 1,
    fn: timed(backend, "decodeN", () => generateStreams(mamba, STREAMS, 4)),
  });
  Deno.bench({
    name: `${backend}: first token after ${FIRST_TOKEN_PROMPT} prompt tokens`,
    group: "first token",
    n,
    warmup: 1,
    fn: timed(backend, "firstToken", async () => {
      const generation = mamba.generate([...prompt.subarray(0, FIRST_TOKEN_PROMPT)], {
        maxNewTokens: 1,
        temperature: 0,
      });
      for await (const _ of generation) break;
      generation.session.dispose();
    }),
  });
}

globalThis.addEventListener("unload", () => {
  const memory = residentMb();
  if (memory) console.error(`peak resident memory of the bench process: ${memory.peak} MB`);
  const table = summary();
  if (table) console.error(`\n${table}`);
});
