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
 * and once at the end.
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
    async fn() {
      const session = mamba.session();
      await session.prefill(prompt);
      session.dispose();
    },
  });
  Deno.bench({
    name: `${backend}: decode ${DECODE} tokens, 1 stream`,
    group: "decode, 1 stream",
    n,
    warmup: 1,
    async fn() {
      await generateStreams(mamba, 1, 4);
    },
  });
  Deno.bench({
    name: `${backend}: decode ${DECODE} tokens x ${STREAMS} streams`,
    group: `decode, ${STREAMS} streams`,
    n,
    warmup: 1,
    async fn() {
      await generateStreams(mamba, STREAMS, 4);
    },
  });
  Deno.bench({
    name: `${backend}: first token after ${FIRST_TOKEN_PROMPT} prompt tokens`,
    group: "first token",
    n,
    warmup: 1,
    async fn() {
      const generation = mamba.generate([...prompt.subarray(0, FIRST_TOKEN_PROMPT)], {
        maxNewTokens: 1,
        temperature: 0,
      });
      for await (const _ of generation) break;
      generation.session.dispose();
    },
  });
}

globalThis.addEventListener("unload", () => {
  const memory = residentMb();
  if (memory) console.error(`peak resident memory of the bench process: ${memory.peak} MB`);
});
