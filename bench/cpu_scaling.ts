/**
 * CPU scaling of the wasm backend against llama.cpp: pp512 and tg128 at 1, 2,
 * 4, 8 and 16 threads (issue 16), in rounds that alternate the two engines at
 * every thread count so that both see the same load.
 *
 * Ours runs as a user's `generate` does: a fresh process per figure that loads
 * the model with `{ backend: "wasm", threads }` and generates 128 tokens
 * (end-of-sequence ignored, greedy) after a 512-token prompt; `first` is that
 * first call (what the CLI reports, warm-up included), `warm` a second call in
 * the same process. llama.cpp runs `llama-bench -p 512 -n 128 -t T -r 1` on a
 * GGUF of the same weights (`../shared/peers/make-gguf.sh <model dir> m.gguf`,
 * made where python is available and copied along). The machine's load
 * (`/proc/loadavg`) is printed beside every round.
 *
 * ```sh
 * deno task make-random-model /tmp/m130   # then make-gguf.sh /tmp/m130 /tmp/m.gguf
 * deno run -A bench/cpu_scaling.ts --model=/tmp/m130 --gguf=/tmp/m.gguf \
 *   --llama-bench=../shared/peers/llama.cpp/llama-bench --threads=1,2,4,8,16 --rounds=3
 * ```
 *
 * Without `--gguf` only ours runs. Prints one line per figure and a JSON
 * summary (median over rounds) at the end.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { loadModel } from "../mod.ts";
import { benchModelDir, promptIds, withTokenizer } from "./make_random_model.ts";

const flags = parseArgs(Deno.args, {
  string: ["model", "tokenizer", "gguf", "llama-bench", "threads", "rounds", "prompt", "tokens"],
  boolean: ["child"],
  default: {
    threads: "1,2,4,8,16",
    rounds: "3",
    prompt: "512",
    tokens: "128",
    "llama-bench": new URL("../../shared/peers/llama.cpp/llama-bench", import.meta.url).pathname,
  },
});

/** A positive integer flag, or a clear error naming it. */
function positive(name: string, raw: string): number {
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) {
    throw new RangeError(`--${name} must be a positive integer, got "${raw}"`);
  }
  return value;
}

const PROMPT = positive("prompt", flags.prompt);
const TOKENS = positive("tokens", flags.tokens);

/** Prefill and decode rates (tokens/s) of one generation. */
interface Rates {
  pp: number;
  tg: number;
}

/** One figure of ours, run in this process: the first and a second generate. */
async function child(dir: string, threads: number): Promise<{ first: Rates; warm: Rates }> {
  const mamba = await loadModel(dir, { backend: "wasm", threads });
  const ids = [...promptIds(PROMPT, mamba.tokenizer.vocabSize)];
  const once = async (): Promise<Rates> => {
    const generation = mamba.generate(ids, {
      maxNewTokens: TOKENS,
      ignoreEos: true,
      temperature: 0,
    });
    for await (const _ of generation) { /* drain */ }
    const { promptTokens, prefillMs, generatedTokens, decodeMs } = generation.stats;
    generation.session.dispose();
    return { pp: promptTokens / (prefillMs / 1000), tg: generatedTokens / (decodeMs / 1000) };
  };
  const first = await once();
  const warm = await once();
  return { first, warm };
}

/** The model directory, with a tokenizer copied in where it has none. */
async function modelDir(): Promise<string> {
  return withTokenizer(flags.model ?? await benchModelDir(), flags.tokenizer);
}

/** Runs a command; its stdout, or an error with its stderr. */
async function output(command: string, args: string[]): Promise<string> {
  const { code, stdout, stderr } = await new Deno.Command(command, { args }).output();
  const decoder = new TextDecoder();
  if (code !== 0) {
    throw new Error(`${command} exited with ${code}: ${decoder.decode(stderr).slice(-2000)}`);
  }
  return decoder.decode(stdout);
}

/** Ours at `threads`, in a fresh process (as a user's CLI run). */
async function ours(dir: string, threads: number): Promise<{ first: Rates; warm: Rates }> {
  const self = new URL(import.meta.url).pathname;
  const text = await output(Deno.execPath(), [
    "run",
    "-A",
    self,
    "--child",
    `--model=${dir}`,
    `--threads=${threads}`,
    `--prompt=${PROMPT}`,
    `--tokens=${TOKENS}`,
  ]);
  return JSON.parse(text.trim().split("\n").at(-1)!);
}

/** llama.cpp's llama-bench at `threads`: pp and tg from its JSON output. */
async function llama(gguf: string, threads: number): Promise<Rates> {
  const text = await output(flags["llama-bench"], [
    "-m",
    gguf,
    "-p",
    `${PROMPT}`,
    "-n",
    `${TOKENS}`,
    "-t",
    `${threads}`,
    "-r",
    "1",
    "-o",
    "json",
  ]);
  const rows: { n_prompt: number; n_gen: number; avg_ts: number }[] = JSON.parse(text);
  const pp = rows.find((r) => r.n_prompt > 0 && r.n_gen === 0);
  const tg = rows.find((r) => r.n_gen > 0 && r.n_prompt === 0);
  if (!pp || !tg) throw new Error(`llama-bench printed no pp/tg rows: ${text.slice(0, 500)}`);
  return { pp: pp.avg_ts, tg: tg.avg_ts };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

const fixed = (x: number) => x.toFixed(1);

if (flags.child) {
  const result = await child(flags.model!, positive("threads", flags.threads));
  console.log(JSON.stringify(result));
} else {
  const threadCounts = flags.threads.split(",").map((t) => positive("threads", t));
  const rounds = positive("rounds", flags.rounds);
  const dir = await modelDir();
  const figures = new Map<number, { first: Rates[]; warm: Rates[]; llama: Rates[] }>();
  for (const threads of threadCounts) figures.set(threads, { first: [], warm: [], llama: [] });
  for (let round = 1; round <= rounds; round++) {
    const load = (await Deno.readTextFile("/proc/loadavg").catch(() => "?")).trim();
    console.log(`round ${round}, load ${load}`);
    for (const threads of threadCounts) {
      const entry = figures.get(threads)!;
      const { first, warm } = await ours(dir, threads);
      entry.first.push(first);
      entry.warm.push(warm);
      let line = `  t=${threads}: ours pp${PROMPT} ${fixed(first.pp)} (warm ${
        fixed(warm.pp)
      }) / tg${TOKENS} ${fixed(first.tg)} (warm ${fixed(warm.tg)})`;
      if (flags.gguf) {
        const native = await llama(flags.gguf, threads);
        entry.llama.push(native);
        line += `; llama.cpp pp ${fixed(native.pp)} / tg ${fixed(native.tg)}; ratio ${
          (first.pp / native.pp).toFixed(2)
        } / ${(first.tg / native.tg).toFixed(2)}`;
      }
      console.log(line);
    }
  }
  const summary = [...figures].map(([threads, entry]) => ({
    threads,
    ours: {
      pp: median(entry.first.map((r) => r.pp)),
      tg: median(entry.first.map((r) => r.tg)),
      warmPp: median(entry.warm.map((r) => r.pp)),
      warmTg: median(entry.warm.map((r) => r.tg)),
    },
    ...(entry.llama.length
      ? {
        llama: {
          pp: median(entry.llama.map((r) => r.pp)),
          tg: median(entry.llama.map((r) => r.tg)),
        },
      }
      : {}),
  }));
  console.log(JSON.stringify({ prompt: PROMPT, tokens: TOKENS, rounds, summary }, null, 2));
}
