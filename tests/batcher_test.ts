/**
 * StepBatcher: concurrent generations sharing one batcher give the reference
 * greedy texts, really run in batches, and one that stops early does not hold
 * the others up.
 */

import { assert, assertEquals } from "@std/assert";
import { StepBatcher } from "../src/batcher.ts";
import { loadModel } from "../src/load.ts";
import { readSamples, SHARED } from "./helpers.ts";

const dir = `${SHARED}/models/tiny-shakespeare`;
const samples = await readSamples();

for (const backend of ["js", "wasm"] as const) {
  Deno.test(`[${backend}] batched greedy generations give the expected texts`, async () => {
    const model = await loadModel(dir, { backend, threads: 1 });
    const batcher = new StepBatcher();
    // Every prompt twice: six generations of 48 tokens, stepped together.
    const prompts = [...samples, ...samples].map((sample) => sample.prompt);
    const texts = await Promise.all(prompts.map(async (prompt) => {
      let text = prompt;
      const options = { maxNewTokens: 48, temperature: 0, batcher };
      for await (const event of model.generate(prompt, options)) text += event.text;
      return text;
    }));
    assertEquals(texts, [...samples, ...samples].map((sample) => sample.greedy_text));
    assert(
      batcher.stats.steps / batcher.stats.batches > 4,
      `mean batch ${batcher.stats.steps / batcher.stats.batches}`,
    );
    model.model.backend.dispose?.();
  });
}

Deno.test("a generation that stops early leaves the batch; the others finish", async () => {
  const model = await loadModel(dir, { backend: "wasm", threads: 1 });
  const batcher = new StepBatcher({ maxWaitMs: 1000 });
  const controller = new AbortController();
  const short = (async () => {
    let count = 0;
    for await (const _ of model.generate("ROMEO:", { maxNewTokens: 48, batcher })) {
      if (++count === 5) controller.abort();
    }
    return count;
  })();
  const aborted = (async () => {
    let count = 0;
    const options = { maxNewTokens: 48, batcher, signal: controller.signal };
    for await (const _ of model.generate("JULIET:", options)) count++;
    return count;
  })();
  const started = performance.now();
  const [shortCount, abortedCount] = await Promise.all([short, aborted]);
  assertEquals(shortCount, 48);
  assert(abortedCount <= 6, `the aborted one generated ${abortedCount}`);
  // With a 1 s wait per step, waiting on the stopped generation would take minutes.
  assert(performance.now() - started < 10_000, "the remaining generation was held up");
  model.model.backend.dispose?.();
});
