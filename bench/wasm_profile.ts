/**
 * Where a prompt's prefill, or the decode of concurrent streams, spends its
 * time on the wasm backend: every backend operation that the model issues is
 * timed (the wasm backend has finished an operation when it returns),
 * outermost calls only, and summed per operation and shape over
 * `session.prefill` of a prompt, or over `--streams` concurrent `generate`
 * calls of `--tokens` ids each after a 16-id prompt.
 *
 * ```sh
 * deno task make-random-model /tmp/m130
 * deno run -A bench/wasm_profile.ts --model=/tmp/m130 --threads=2 --prompt=512 --reps=3
 * deno run -A bench/wasm_profile.ts --model=/tmp/m130 --streams=16 --tokens=64 --reps=3
 * ```
 *
 * Prints, per repetition, the tok/s and one line per operation: its total
 * milliseconds and calls. Without `--model`, the mamba-130m-shaped
 * random model is written to a temp dir first.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { loadModel } from "../mod.ts";
import type { Backend } from "../src/backend.ts";
import { benchModelDir, promptIds } from "./make_random_model.ts";

const flags = parseArgs(Deno.args, {
  string: ["model", "threads", "prompt", "reps", "streams", "tokens"],
  default: { threads: "2", prompt: "512", reps: "3", tokens: "64" },
});

const streams = flags.streams === undefined ? 0 : Number(flags.streams);
const tokens = Number(flags.tokens);
if (!(Number.isInteger(streams) && streams >= 0 && Number.isInteger(tokens) && tokens > 0)) {
  throw new Error(
    `--streams must be a whole number and --tokens a positive one, got ${flags.streams}, ${flags.tokens}`,
  );
}

/** The operation's name with the shape that tells its calls apart. */
function label(name: string, args: unknown[]): string {
  const first = args[0] as Record<string, unknown> | undefined;
  if (name === "linear" && first) {
    return `linear ${first.inDim}→${first.outDim} rows ${first.rows}${
      first.accumulate ? " +=" : ""
    }`;
  }
  if (name === "linearSplit" && first) {
    return `linearSplit ${first.inDim}→${(first.widths as number[]).join("+")}`;
  }
  return name;
}

/**
 * Wraps every method of `backend` (but capture and replay, which run others)
 * to add its time to `totals`; calls made inside another are not counted again.
 */
function instrument(backend: Backend, totals: Map<string, { ms: number; calls: number }>): void {
  let depth = 0;
  const methods = backend as unknown as Record<string, (...args: unknown[]) => unknown>;
  for (const name of Object.getOwnPropertyNames(Object.getPrototypeOf(backend))) {
    const method = methods[name];
    if (typeof method !== "function" || ["constructor", "capture", "replay"].includes(name)) {
      continue;
    }
    methods[name] = function (this: unknown, ...args: unknown[]) {
      if (depth > 0) return method.apply(this, args);
      depth++;
      const start = performance.now();
      try {
        return method.apply(this, args);
      } finally {
        depth--;
        const key = label(name, args);
        const total = totals.get(key) ?? { ms: 0, calls: 0 };
        total.ms += performance.now() - start;
        total.calls++;
        totals.set(key, total);
      }
    };
  }
}

const model = await loadModel(flags.model ?? await benchModelDir(), {
  backend: "wasm",
  threads: Number(flags.threads),
});
const totals = new Map<string, { ms: number; calls: number }>();
instrument(model.model.backend, totals);
const vocab = model.model.config.vocabSize;

/** Prefills the prompt, or decodes the streams; answers the ids it made. */
async function work(): Promise<number> {
  if (streams === 0) {
    const prompt = promptIds(Number(flags.prompt), vocab);
    const session = model.session();
    await session.prefill(prompt);
    session.dispose();
    return prompt.length;
  }
  await Promise.all(Array.from({ length: streams }, async (_, i) => {
    const prompt = [...promptIds(16 + i, vocab).subarray(i)];
    const generation = model.generate(prompt, { maxNewTokens: tokens, ignoreEos: true });
    for await (const _ of generation);
    generation.session.dispose();
  }));
  return streams * tokens;
}

if (streams > 0) await work(); // Warm-up: the threads start and the pool fills.
for (let rep = 0; rep < Number(flags.reps); rep++) {
  totals.clear();
  const start = performance.now();
  const ids = await work();
  const ms = performance.now() - start;
  console.log(`rep ${rep}: ${ms.toFixed(0)} ms, ${(ids / ms * 1000).toFixed(1)} tok/s`);
  for (const [key, { ms, calls }] of [...totals].sort((a, b) => b[1].ms - a[1].ms)) {
    if (ms >= 0.5) console.log(`  ${key.padEnd(32)} ${ms.toFixed(1).padStart(8)} ms  ×${calls}`);
  }
}
model.dispose();
