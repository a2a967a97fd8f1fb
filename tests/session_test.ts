/**
 * Sessions, snapshots and the generation loop on the bundled model: a
 * snapshot taken mid-generation resumes exactly, seeded sampling repeats,
 * stop strings, aborts and limits behave.
 */

import { assert, assertEquals, assertNotEquals, assertRejects, assertThrows } from "@std/assert";
import { generate } from "../src/generate.ts";
import { loadModel } from "../src/load.ts";
import { Sampler } from "../src/sampler.ts";
import { SnapshotError } from "../src/session.ts";
import { readSamples } from "./helpers.ts";

const model = await loadModel(new URL("../models/tiny-shakespeare/", import.meta.url), {
  backend: "js",
});
const PROMPT = "JULIET:\nO Romeo, Romeo!";

async function collect(
  generation: AsyncIterable<{ token: number; text: string }>,
): Promise<{ ids: number[]; text: string }> {
  const ids: number[] = [];
  let text = "";
  for await (const event of generation) {
    ids.push(event.token);
    text += event.text;
  }
  return { ids, text };
}

Deno.test("snapshot after 10 greedy tokens resumes identically to an uninterrupted run", async () => {
  const whole = await collect(model.generate(PROMPT, { maxNewTokens: 20, temperature: 0 }));

  const first = model.generate(PROMPT, { maxNewTokens: 10, temperature: 0 });
  const head = await collect(first);
  const snapshot = await first.session.snapshot();
  const resumed = model.session(snapshot);
  assertEquals(resumed.tokens, first.session.tokens);
  const tail = await collect(
    model.generate("", { maxNewTokens: 10, temperature: 0, session: resumed }),
  );

  assertEquals([...head.ids, ...tail.ids], whole.ids);
  assertEquals(head.text + tail.text, whole.text);
});

Deno.test("snapshot with seeded sampling and the sampler's state resumes identically", async () => {
  const options = { temperature: 1, topK: 0, topP: 1, minP: 0, seed: 42 };
  const prompt = model.tokenizer.encode(PROMPT);
  const run = async (steps: number, sampler: Sampler, session = model.session()) => {
    let logits = session.lastLogits ?? await session.prefill(prompt);
    const ids: number[] = [];
    for (let i = 0; i < steps; i++) {
      const id = sampler.sample(logits, session.tokens);
      ids.push(id);
      logits = await session.step(id);
    }
    return { ids, session };
  };
  const whole = await run(20, new Sampler(options));

  const sampler = new Sampler(options);
  const head = await run(10, sampler);
  const samplerState = sampler.state();
  const resumed = model.session(await head.session.snapshot());
  const resumedSampler = new Sampler(options);
  resumedSampler.restore(samplerState);
  const tail = await run(10, resumedSampler, resumed);
  assertEquals([...head.ids, ...tail.ids], whole.ids);
});

Deno.test("a session made from a snapshot promise continues like the original", async () => {
  const original = model.session();
  await original.prefill(model.tokenizer.encode(PROMPT));
  const resumed = model.session(original.snapshot());
  const expected = await original.step(11);
  assertEquals(await resumed.step(11), expected);
  assertEquals(resumed.tokens, original.tokens);
});

Deno.test("seeded generation repeats; another seed differs", async () => {
  const options = { maxNewTokens: 24, temperature: 1.0, seed: 7 };
  const a = await collect(model.generate(PROMPT, options));
  const b = await collect(model.generate(PROMPT, options));
  const c = await collect(model.generate(PROMPT, { ...options, seed: 8 }));
  assertEquals(a, b);
  assertNotEquals(a.ids, c.ids);
});

Deno.test("a snapshot for another model or a damaged one is refused", async () => {
  const session = model.session();
  await session.prefill(model.tokenizer.encode("ROMEO:"));
  const snapshot = await session.snapshot();
  assertThrows(
    () => model.session(snapshot.subarray(0, snapshot.length - 4)),
    SnapshotError,
    "holds",
  );
  const otherLayers = snapshot.slice();
  new DataView(otherLayers.buffer).setUint32(8, 7, true);
  assertThrows(() => model.session(otherLayers), SnapshotError, "nLayer 7");
  assertThrows(() => model.session(new Uint8Array(64)), SnapshotError, "header");
  const fromPromise = model.session(Promise.resolve(new Uint8Array(3)));
  await assertRejects(() => fromPromise.step(1), SnapshotError);
});

Deno.test("stop strings end generation before the stop text", async () => {
  const samples = await readSamples();
  const full: string = samples[0].greedy_text; // "ROMEO:\nIf I were Richard that I would ..."
  const generation = model.generate("ROMEO:", {
    maxNewTokens: 48,
    temperature: 0,
    stop: ["Richard"],
  });
  const { text } = await collect(generation);
  assertEquals("ROMEO:" + text, full.slice(0, full.indexOf("Richard")));
  assertEquals(generation.stats.finishReason, "stop");
});

Deno.test("an aborted generation stops between tokens", async () => {
  const controller = new AbortController();
  const generation = model.generate(PROMPT, {
    maxNewTokens: 40,
    temperature: 0,
    signal: controller.signal,
  });
  let count = 0;
  for await (const _ of generation) {
    if (++count === 3) controller.abort();
  }
  assertEquals(count, 3);
  assertEquals(generation.stats.finishReason, "abort");
});

Deno.test("maxNewTokens 0 generates nothing; bad options are refused", async () => {
  const generation = model.generate(PROMPT, { maxNewTokens: 0 });
  assertEquals((await collect(generation)).ids, []);
  assertThrows(() => model.generate(PROMPT, { maxNewTokens: -1 }), RangeError);
  assertThrows(() => model.generate(PROMPT, { temperature: -1 }), RangeError);
  await assertRejects(() => collect(model.generate("", {})), RangeError, "empty prompt");
});

Deno.test("generation stats count prompt and generated tokens", async () => {
  const generation = model.generate("ROMEO:", { maxNewTokens: 5, temperature: 0 });
  const { ids } = await collect(generation);
  assertEquals(ids.length, 5);
  assertEquals(generation.stats.promptTokens, 2);
  assertEquals(generation.stats.generatedTokens, 5);
  assert(generation.stats.prefillMs >= 0 && generation.stats.decodeMs > 0);
});

Deno.test("text held back for a stop string is still emitted when the end-of-sequence id comes", async () => {
  const { ids } = await collect(model.generate(PROMPT, { maxNewTokens: 16, temperature: 0 }));
  // Pretend a later id that has not come before ends the sequence.
  const end = ids.findIndex((id, i) => i >= 4 && !ids.slice(0, i).includes(id));
  const promptIds = model.tokenizer.encode(PROMPT);
  const wanted = model.tokenizer.decode([...promptIds, ...ids.slice(0, end)]);
  // A stop string starting with the text's last character makes generate hold it back.
  const stop = [`${wanted.at(-1)}\u0001`];
  const stopper = {
    tokenizer: model.tokenizer,
    vocabSize: model.vocabSize,
    eosTokenId: ids[end],
    session: () => model.session(),
  };
  const generation = generate(stopper, PROMPT, { maxNewTokens: 16, temperature: 0, stop });
  const { text } = await collect(generation);
  assertEquals(PROMPT + text, wanted);
  assertEquals(generation.stats.finishReason, "eos");
  assertEquals(generation.stats.generatedTokens, end);
});
