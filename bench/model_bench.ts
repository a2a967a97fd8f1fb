/**
 * End-to-end speed of each backend: prefill (a whole prompt) and decode (one
 * token per step) on the bundled tiny-shakespeare model and on a
 * mamba-130m-shaped model with random weights.
 *
 * `deno task bench:all` runs it. The 130m model is read from `$MAMBA_BENCH_MODEL`
 * (written by `deno task make-random-model <dir>`), else written to a temp dir
 * first. Each bench's name says how many tokens one iteration processes:
 * tokens/s = tokens / (time per iteration). `$MAMBA_BENCH_BACKENDS` (comma
 * separated, e.g. `js,wasm`) limits the backends; the software WebGPU adapter
 * of a machine without a GPU takes minutes on the 130m shape.
 *
 * @module
 */

import { BACKEND_NAMES, createBackend } from "../src/backends/registry.ts";
import type { BackendName } from "../src/backends/registry.ts";
import { loadCheckpoint } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { Session } from "../src/session.ts";
import { benchModelDir, promptIds } from "./make_random_model.ts";

const requested = Deno.env.get("MAMBA_BENCH_BACKENDS")?.split(",");
const backends = BACKEND_NAMES.filter((name) =>
  name !== "auto" && (!requested || requested.includes(name))
) as BackendName[];

/**
 * Token counts per model: every backend runs the short counts, in groups whose
 * baseline is the js reference; the fast backends also run the long counts
 * (a 512-token prompt, 128 new tokens), which the reference would take minutes on.
 */
const models = [
  {
    label: "tiny-shakespeare",
    dir: new URL("../models/tiny-shakespeare/", import.meta.url),
    prefill: { short: 64, long: 512 },
    decode: { short: 16, long: 128 },
  },
  {
    label: "130m-shaped",
    dir: await benchModelDir(),
    prefill: { short: 16, long: 512 },
    decode: { short: 4, long: 128 },
  },
];

for (const { label, dir, prefill, decode } of models) {
  const checkpoint = await loadCheckpoint(dir);
  const vocab = checkpoint.config.vocabSize;
  for (const name of backends) {
    const model = new MambaModel(await createBackend(name), checkpoint.config, checkpoint.weights);
    const lengths = name === "js" ? ["short"] as const : ["short", "long"] as const;
    for (const length of lengths) {
      const prompt = promptIds(prefill[length], vocab);
      const steps = decode[length];
      Deno.bench({
        name: `${name}: prefill ${prompt.length} tokens`,
        group: `${label} prefill ${prompt.length} tokens`,
        baseline: name === "js",
        n: name === "js" ? 2 : 5,
        warmup: 1,
        async fn() {
          const session = new Session(model);
          await session.prefill(prompt);
          session.dispose();
        },
      });
      Deno.bench({
        name: `${name}: decode ${steps} tokens`,
        group: `${label} decode ${steps} tokens`,
        baseline: name === "js",
        n: name === "js" ? 2 : 5,
        warmup: 1,
        async fn(b) {
          const session = new Session(model);
          await session.prefill(prompt.subarray(0, 1));
          b.start();
          for (let i = 0; i < steps; i++) await session.step(prompt[i % prompt.length]);
          b.end();
          session.dispose();
        },
      });
    }
  }
}
