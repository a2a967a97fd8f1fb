/**
 * Perplexity of models on the held-out tail of a text (default: the last 10%
 * of ../shared/data/tinyshakespeare.txt, which the bundled model was not
 * trained on), one line per model: a directory, URL, repo id or .gguf file.
 * The text is cut into windows of 512 tokens, each from a fresh state (as
 * llama.cpp's perplexity cuts it into contexts), and every token after a
 * window's first is scored.
 *
 *   deno run -A bench/perplexity.ts [--backend wasm] [--text file] MODEL...
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import type { BackendName } from "../src/backends/registry.ts";
import { loadModel } from "../src/load.ts";

const args = parseArgs(Deno.args, {
  string: ["backend", "text"],
  default: {
    backend: "wasm",
    text: new URL("../../shared/data/tinyshakespeare.txt", import.meta.url).pathname,
  },
});
const text = await Deno.readTextFile(args.text);
const heldOut = text.slice(Math.floor(text.length * 0.9));
/** Tokens per window, each run from a fresh state. */
const WINDOW = 512;

for (const source of args._.map(String)) {
  const mamba = await loadModel(source, { backend: args.backend as BackendName });
  const ids = Int32Array.from(mamba.tokenizer.encode(heldOut));
  const { model } = mamba;
  const vocab = model.config.vocabSize;
  let nll = 0;
  let predicted = 0;
  const started = performance.now();
  for (let start = 0; start + 1 < ids.length; start += WINDOW) {
    const window = ids.subarray(start, Math.min(start + WINDOW, ids.length));
    const slot = model.pool.acquire();
    const logits = await model.forward(slot, window);
    model.pool.release(slot);
    for (let t = 0; t + 1 < window.length; t++) {
      const row = logits.subarray(t * vocab, (t + 1) * vocab);
      let max = -Infinity;
      for (const v of row) max = Math.max(max, v);
      let sum = 0;
      for (const v of row) sum += Math.exp(v - max);
      nll += Math.log(sum) + max - row[window[t + 1]];
      predicted++;
    }
  }
  console.log(
    `${source}\t${predicted} tokens scored\tppl ${Math.exp(nll / predicted).toFixed(4)}\t` +
      `(${((performance.now() - started) / 1000).toFixed(1)} s, ${mamba.backend})`,
  );
  mamba.model.backend.dispose();
}
