/**
 * End-to-end speed of each backend: prefill (a whole prompt) and decode (one
 * token per step) on the bundled tiny-shakespeare model and on a
 * mamba-130m-shaped model with random weights.
 *
 * `deno task bench` runs it. The 130m model is read from `$MAMBA_BENCH_MODEL`
 * (written by `deno task make-random-model <dir>`), else written to a temp dir
 * first. Each bench's name says how many tokens one iteration processes:
 * tokens/s = tokens / (time per iteration).
 *
 * @module
 */

import { BACKEND_NAMES, createBackend } from "../src/backends/registry.ts";
import type { BackendName } from "../src/backends/registry.ts";
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { Session } from "../src/session.ts";
import { MAMBA_130M, writeRandomModel } from "./make_random_model.ts";

const backends = BACKEND_NAMES.filter((name) => name !== "auto") as BackendName[];

async function randomModelDir(): Promise<string> {
  const fromEnv = Deno.env.get("MAMBA_BENCH_MODEL");
  if (fromEnv) return fromEnv;
  const dir = await Deno.makeTempDir({ prefix: "mamba-bench-" });
  await writeRandomModel(dir, MAMBA_130M);
  return dir;
}

const models = [
  {
    label: "tiny-shakespeare",
    dir: new URL("../models/tiny-shakespeare/", import.meta.url),
    prefillTokens: { js: 64, fast: 512 },
    decodeTokens: { js: 16, fast: 128 },
  },
  {
    label: "130m-shaped",
    dir: await randomModelDir(),
    prefillTokens: { js: 16, fast: 512 },
    decodeTokens: { js: 4, fast: 128 },
  },
];

function promptIds(count: number, vocab: number): Int32Array {
  return Int32Array.from({ length: count }, (_, i) => (i * 7919 + 13) % vocab);
}

for (const { label, dir, prefillTokens, decodeTokens } of models) {
  const checkpoint = await loadCheckpoint(dir);
  for (const name of backends) {
    const model = new MambaModel(await createBackend(name), checkpoint.config, checkpoint.weights);
    const speed = name === "js" ? "js" : "fast";
    const prompt = promptIds(prefillTokens[speed], checkpoint.config.vocabSize);
    const steps = decodeTokens[speed];
    Deno.bench({
      name: `${name}: prefill ${prompt.length} tokens`,
      group: `${label} prefill`,
      baseline: name === "js",
      n: name === "js" ? 2 : 5,
      warmup: 1,
      async fn() {
        await new Session(model).prefill(prompt);
      },
    });
    Deno.bench({
      name: `${name}: decode ${steps} tokens`,
      group: `${label} decode`,
      baseline: name === "js",
      n: name === "js" ? 2 : 5,
      warmup: 1,
      async fn(b) {
        const session = new Session(model);
        await session.prefill(prompt.subarray(0, 1));
        b.start();
        for (let i = 0; i < steps; i++) await session.step(prompt[i % prompt.length]);
        b.end();
      },
    });
  }
}
