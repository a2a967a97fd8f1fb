/**
 * The decode engine through what users call (`generate`, `Session`), on
 * every backend, against reference data: the tiny-shakespeare greedy ids of
 * ../shared, the hf-oracle greedy ids, and for sampling the host path (the
 * logits of each step read back and drawn from by `Sampler.sample`, which
 * `sampler_test.ts` checks against llama.cpp's arithmetic).
 */

import { assert, assertEquals, assertRejects } from "@std/assert";
import { type BackendName, type BackendOptions, createBackend } from "../src/backends/registry.ts";
import { engineFor } from "../src/engine.ts";
import { generate, type Generator } from "../src/generate.ts";
import { loadCheckpoint, loadModel, type Mamba } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { Sampler, type SamplingOptions } from "../src/sampler.ts";
import { Session } from "../src/session.ts";
import { StatePool } from "../src/pool.ts";
import { parseConfig } from "../src/config.ts";
import { maxAbsDiff, readSamples, SHARED } from "./helpers.ts";

const adapter = await navigator.gpu?.requestAdapter();

const BACKENDS: { label: string; name: BackendName; options?: BackendOptions; ignore?: boolean }[] =
  [
    { label: "js", name: "js" },
    { label: "wasm", name: "wasm", options: { threads: 1 } },
    { label: "webgpu", name: "webgpu", ignore: !adapter },
  ];

const TINY = `${SHARED}/models/tiny-shakespeare`;

/** The tiny-shakespeare reference: prompt i's ids and its 48 greedy ids. */
async function reference(): Promise<{ prompts: number[][]; greedy: number[][]; texts: string[] }> {
  const expected = SafetensorsFile.parse(await Deno.readFile(`${TINY}/expected.safetensors`), TINY);
  const samples = await readSamples();
  const prompts = samples.map((_, i) => [...expected.int32(`prompt${i}_ids`)]);
  const greedy = samples.map((_, i) => [...expected.int32(`prompt${i}_greedy_ids`)].slice(-48));
  return { prompts, greedy, texts: samples.map((s) => s.greedy_text) };
}

/**
 * The ids `options` draws after `prompt` on the host path: the logits of
 * every step read back, one `Sampler.sample` per id.
 */
async function hostPath(
  model: MambaModel<unknown>,
  prompt: number[],
  options: SamplingOptions,
  count: number,
): Promise<{ ids: number[]; sampler: Sampler }> {
  const session = new Session(model);
  const sampler = new Sampler(options);
  let logits = await session.prefill(prompt);
  const ids: number[] = [];
  for (let i = 0; i < count; i++) {
    const id = sampler.sample(logits, session.tokens, model.config.vocabSize);
    ids.push(id);
    logits = await session.step(id);
  }
  session.dispose();
  return { ids, sampler };
}

/** Resolves once the calls already made have settled (a disposed session frees its slot after them). */
const settled = () => new Promise((resolve) => setTimeout(resolve, 0));

/** Sampling options each stream of the batch tests uses: greedy and sampled, narrow and wide. */
const STREAM_OPTIONS: SamplingOptions[] = [
  { temperature: 0.9, topK: 40, topP: 0.95, minP: 0.05, seed: 11 },
  { temperature: 0.9, topK: 40, seed: 12, repetitionPenalty: 1.3, repeatLastN: 16 },
  { temperature: 0, repetitionPenalty: 1.2, repeatLastN: 8, seed: 15 },
  { temperature: 0.7, topK: 0, topP: 0.9, seed: 13 },
  { temperature: 1.1, topK: 100, seed: 14 },
];

for (const { label, name, options, ignore } of BACKENDS) {
  const load = () => loadModel(TINY, { backend: name, ...options });
  const test = (what: string, fn: (mamba: Mamba) => Promise<void>) =>
    Deno.test({
      name: `[${label}] ${what}`,
      ignore,
      fn: async () => {
        const mamba = await load();
        try {
          await fn(mamba);
        } finally {
          mamba.dispose();
        }
      },
    });

  Deno.test({
    name:
      `[${label}] loaded for 4 streams, the steps and prompt pieces recorded ahead give the reference ids`,
    ignore,
    fn: async () => {
      // The warm-up records every batch's step and short prompts' pieces up to 4 streams.
      const mamba = await loadModel(TINY, { backend: name, ...options, batch: 4 });
      try {
        const { prompts, greedy } = await reference();
        const streams = Array.from({ length: 4 }, async (_, i) => {
          const ids: number[] = [];
          const generation = mamba.generate(prompts[i % prompts.length], {
            maxNewTokens: 6 + 5 * i,
            temperature: 0,
          });
          for await (const event of generation) ids.push(event.token);
          return ids;
        });
        (await Promise.all(streams)).forEach((ids, i) =>
          assertEquals(ids, greedy[i % prompts.length].slice(0, 6 + 5 * i), `stream ${i}`)
        );
      } finally {
        mamba.dispose();
      }
    },
  });

  test("a seeded stream draws the host path's ids alone, in two calls, and inside a batch", async (mamba) => {
    const model = mamba.model;
    const { prompts } = await reference();
    const count = 20;
    const wanted: { ids: number[]; sampler: Sampler }[] = [];
    for (const [i, streamOptions] of STREAM_OPTIONS.entries()) {
      wanted.push(await hostPath(model, prompts[i % prompts.length], streamOptions, count));
    }
    // Alone, in two calls: the sampler carries on, and ends as the host's.
    for (const [i, streamOptions] of STREAM_OPTIONS.entries()) {
      const session = new Session(model);
      const sampler = new Sampler(streamOptions);
      const first = await session.decode({
        prompt: prompts[i % prompts.length],
        sampler,
        maxTokens: 7,
      });
      const rest = await session.sample(count - 7, sampler);
      assertEquals([...first.ids, ...rest.ids], wanted[i].ids, `stream ${i} alone`);
      assertEquals(sampler.state(), wanted[i].sampler.state(), `stream ${i}'s sampler`);
      session.dispose();
    }
    // Together, each twice: stream i starts after delayMs(i).
    const together = async (delayMs: (i: number) => number, how: string) => {
      const streams = [...STREAM_OPTIONS, ...STREAM_OPTIONS].map(async (streamOptions, i) => {
        const delay = delayMs(i);
        if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
        const session = new Session(model);
        const result = await session.decode({
          prompt: prompts[i % STREAM_OPTIONS.length % prompts.length],
          sampler: new Sampler(streamOptions),
          maxTokens: count,
        });
        session.dispose();
        return result.ids;
      });
      (await Promise.all(streams)).forEach((ids, i) =>
        assertEquals(ids, wanted[i % STREAM_OPTIONS.length].ids, `stream ${i} ${how}`)
      );
      await settled();
    };
    await together((i) => 3 * i, "joining one after the other");
    // All at once, they join one round on consecutive slots, and their rings
    // of recent ids (the repetition penalty's) are written together.
    await together(() => 0, "joining together");
    assertEquals(model.pool.used, 0, "every slot is free again");
  });

  test("concurrent generate calls give the greedy texts; EOS and stop strings end at the exact id", async (mamba) => {
    const { prompts, greedy, texts } = await reference();
    const samples = await readSamples();
    const greedyText = async (prompt: string, generation: ReturnType<Mamba["generate"]>) => {
      let text = prompt;
      for await (const event of generation) text += event.text;
      return text;
    };
    // Every prompt twice at once, with different lengths.
    const lengths = [48, 17, 48, 5];
    const runs = lengths.map((maxNewTokens, i) => {
      const { prompt } = samples[i % samples.length];
      const generation = mamba.generate(prompt, { temperature: 0, maxNewTokens });
      return greedyText(prompt, generation).then((text) => ({ text, generation }));
    });
    for (const [i, { text, generation }] of (await Promise.all(runs)).entries()) {
      const p = i % samples.length;
      const ids = generation.session.tokens.slice(prompts[p].length);
      assertEquals(ids, greedy[p].slice(0, lengths[i]), `run ${i}`);
      if (lengths[i] === 48) assertEquals(text, texts[p], `run ${i}`);
      assertEquals(generation.stats.finishReason, "length");
    }

    // A stop string inside the continuation: the text stops right before it,
    // the session holds the ids up to the one that completed it.
    const p = 0;
    const continuation = texts[p].slice(samples[p].prompt.length);
    const stop = continuation.slice(20, 24);
    const stopping = mamba.generate(samples[p].prompt, {
      temperature: 0,
      maxNewTokens: 48,
      stop: [stop],
    });
    const text = await greedyText(samples[p].prompt, stopping);
    assertEquals(text, samples[p].prompt + continuation.slice(0, continuation.indexOf(stop)));
    assertEquals(stopping.stats.finishReason, "stop");
    const fed = stopping.session.tokens.slice(prompts[p].length);
    assertEquals(fed, greedy[p].slice(0, fed.length));
    const decodedUpTo = (n: number) => mamba.tokenizer.decode(greedy[p].slice(0, n));
    assert(decodedUpTo(fed.length).includes(stop), "the last id fed completes the stop string");
    assert(!decodedUpTo(fed.length - 1).includes(stop), "…and no earlier one does");

    // An end-of-sequence id (here the 10th greedy id, for a model that calls
    // it so) ends before it: not emitted, not fed.
    const eos = greedy[p][9];
    const at = greedy[p].indexOf(eos);
    const eosModel: Generator = {
      tokenizer: mamba.tokenizer,
      vocabSize: mamba.config.vocabSize,
      eosTokenId: eos,
      session: () => new Session(mamba.model),
    };
    const ending = generate(eosModel, prompts[p], { temperature: 0, maxNewTokens: 48 });
    const tokens: number[] = [];
    for await (const event of ending) if (event.token !== eos) tokens.push(event.token);
    assertEquals(tokens, greedy[p].slice(0, at));
    assertEquals(ending.stats.finishReason, "eos");
    assertEquals(ending.session.tokens, [...prompts[p], ...greedy[p].slice(0, at)]);
    // The session continues past the end as if it had been fed the ids itself.
    assertEquals((await ending.session.greedy(3)).ids, greedy[p].slice(at, at + 3));
  });

  test("40 concurrent greedy streams, a batch past 32 rows (on webgpu, matmuls split over K whose sums the conv step and the residual norm add up), give the greedy ids", async (mamba) => {
    const { prompts, greedy } = await reference();
    const count = 12;
    const streams = Array.from({ length: 40 }, async (_, i) => {
      const session = new Session(mamba.model);
      const result = await session.decode({
        prompt: prompts[i % prompts.length],
        sampler: new Sampler({ temperature: 0 }),
        maxTokens: count,
      });
      session.dispose();
      return result.ids;
    });
    (await Promise.all(streams)).forEach((ids, i) =>
      assertEquals(ids, greedy[i % prompts.length].slice(0, count), `stream ${i}`)
    );
  });

  test("a burst of prompts of different lengths joins one round, as one prompt does", async (mamba) => {
    const engine = engineFor(mamba.model);
    const { prompts, greedy } = await reference();
    /** Rounds issued while greedy streams from prompts `which` (2, 9 and 8 ids) give 6 ids each. */
    const run = async (which: number[]) => {
      const rounds = engine.stats.rounds;
      const ids = await Promise.all(which.map(async (p) => {
        const generation = mamba.generate(prompts[p], { maxNewTokens: 6, temperature: 0 });
        const picked: number[] = [];
        for await (const event of generation) picked.push(event.token);
        generation.session.dispose();
        return picked;
      }));
      return { rounds: engine.stats.rounds - rounds, ids };
    };
    const alone = await run([1]);
    const which = [0, 1, 2, 2, 1, 0];
    const burst = await run(which);
    burst.ids.forEach((ids, b) => assertEquals(ids, greedy[which[b]].slice(0, 6), `stream ${b}`));
    // Fed in one chunk, the prompts start together: no stream waits a round for a shorter one.
    assertEquals(burst.rounds, alone.rounds);
  });

  test("a consumer that leaves or aborts ends its stream; slots are reused", async (mamba) => {
    const { prompts, greedy } = await reference();
    const prompt = prompts[1];
    const full = greedy[1];
    const capacity = mamba.model.pool.capacity;
    for (let round = 0; round < 3; round++) {
      // The consumer leaves after 6 ids: the session holds a prefix of the
      // greedy ids (the stream may have run a round further) and continues.
      const leaving = mamba.generate(prompt, { temperature: 0, maxNewTokens: 40 });
      const seen: number[] = [];
      for await (const event of leaving) {
        seen.push(event.token);
        if (seen.length === 6) break;
      }
      assertEquals(seen, full.slice(0, 6));
      const kept = (await leaving.session.greedy(0).then(() => leaving.session.tokens))
        .slice(prompt.length);
      assert(kept.length >= 6 && kept.length < 40, `fed ${kept.length}`);
      assertEquals(kept, full.slice(0, kept.length));
      assertEquals((await leaving.session.greedy(3)).ids, full.slice(kept.length, kept.length + 3));
      leaving.session.dispose();

      // An abort ends it as "abort"; the session holds exactly what was emitted.
      const controller = new AbortController();
      const aborting = mamba.generate(prompt, {
        temperature: 0,
        maxNewTokens: 40,
        signal: controller.signal,
      });
      const emitted: number[] = [];
      for await (const event of aborting) {
        emitted.push(event.token);
        if (emitted.length === 5) controller.abort();
      }
      assertEquals(aborting.stats.finishReason, "abort");
      assertEquals(emitted, full.slice(0, emitted.length));
      assertEquals(aborting.session.tokens, [...prompt, ...emitted]);
      aborting.session.dispose();
    }
    await settled();
    assertEquals(mamba.model.pool.used, 0);
    assertEquals(mamba.model.pool.capacity, capacity, "the pool did not grow: slots were reused");
  });

  test("finished generations lend their slots to later ones and continue the greedy ids after", async (mamba) => {
    const { prompts, greedy } = await reference();
    const pool = mamba.model.pool;
    const capacity = pool.capacity;
    // Kept referenced, so the collector frees none of their sessions' slots.
    const finished = [];
    for (let i = 0; i < 3 * capacity; i++) {
      const p = i % prompts.length;
      const generation = mamba.generate(prompts[p], { temperature: 0, maxNewTokens: 6 });
      const ids: number[] = [];
      for await (const event of generation) ids.push(event.token);
      assertEquals(ids, greedy[p].slice(0, 6), `generation ${i}`);
      finished.push(generation);
    }
    assertEquals(pool.capacity, capacity, "the pool did not grow");
    // The first one's slot went to a later generation: its session feeds its
    // ids again and goes on with the reference's greedy ids, as does the last,
    // which kept its slot.
    assertEquals(finished[0].session.slot, -1);
    assertEquals((await finished[0].session.greedy(5)).ids, greedy[0].slice(6, 11));
    const last = finished.at(-1)!;
    const p = (finished.length - 1) % prompts.length;
    assertEquals((await last.session.greedy(5)).ids, greedy[p].slice(6, 11));
    // A snapshot of a session that gave its slot up resumes the same ids;
    // it holds only the snapshot's last ids, so parking it keeps its slot.
    const snapshot = await finished[1].session.snapshot();
    for (const generation of finished) generation.session.dispose();
    const resumed = mamba.session(snapshot);
    resumed.park();
    for (let i = 0; i < 2 * capacity; i++) {
      for await (const _ of mamba.generate(prompts[0], { temperature: 0, maxNewTokens: 1 }));
    }
    assert(resumed.slot >= 0, "the resumed session kept its slot");
    assertEquals((await resumed.greedy(4)).ids, greedy[1].slice(6, 10));
    resumed.dispose();
    // The last generations' sessions stay parked on their slots until taken back or collected.
    assertEquals(pool.capacity, capacity, "the pool never grew");
  });

  test("a burst of new streams on slots that an earlier burst left dirty starts each from zero: the greedy ids", async (mamba) => {
    const { prompts, greedy } = await reference();
    const pool = mamba.model.pool;
    const burst = async (count: number, label: string) => {
      const streams = Array.from({ length: count }, async (_, i) => {
        const generation = mamba.generate(prompts[i % prompts.length], {
          temperature: 0,
          maxNewTokens: 10,
        });
        const ids: number[] = [];
        for await (const event of generation) ids.push(event.token);
        generation.session.dispose();
        return ids;
      });
      (await Promise.all(streams)).forEach((ids, i) =>
        assertEquals(ids, greedy[i % prompts.length].slice(0, 10), `${label}: stream ${i}`)
      );
      await settled();
    };
    await burst(9, "first burst");
    const capacity = pool.capacity;
    // Every slot of the second burst held a sequence of the first, which the
    // pool zeroes together when the burst's prompts are fed.
    await burst(9, "second burst");
    assertEquals(pool.capacity, capacity, "the second burst took the first one's slots");
    assertEquals(pool.used, 0);
  });

  test("prompts of every piece shape give the teacher-forced logits, alone and together", async (mamba) => {
    const model = mamba.model;
    const expected = SafetensorsFile.parse(
      await Deno.readFile(`${TINY}/expected.safetensors`),
      TINY,
    );
    const ids = expected.int32("prompt0_greedy_ids");
    const logits = expected.float32("prompt0_logits");
    const vocab = model.config.vocabSize;
    const wanted = (len: number) => logits.subarray((len - 1) * vocab, len * vocab);
    const engine = engineFor(model);
    const replayed = engine.stats.replayedPieces;
    // One id, a sum of powers of two, a whole piece of 32, and pieces of 32 with remainders.
    const lengths = [1, 7, 32, 33, 45, ids.length];
    for (const len of lengths) {
      const session = new Session(model);
      const got = await session.prefill(ids.subarray(0, len));
      const diff = maxAbsDiff(got, wanted(len));
      assert(diff <= 1e-3, `${len} ids alone: max abs diff ${diff}`);
      session.dispose();
    }
    // Together: each chunk feeds its sequences the same number of ids at a time.
    const sessions = lengths.map(() => new Session(model));
    const together = await Promise.all(
      sessions.map((session, i) => session.prefill(ids.subarray(0, lengths[i]))),
    );
    together.forEach((got, i) => {
      const diff = maxAbsDiff(got, wanted(lengths[i]));
      assert(diff <= 1e-3, `${lengths[i]} ids together: max abs diff ${diff}`);
    });
    for (const session of sessions) session.dispose();
    if (model.backend.queued) {
      assert(engine.stats.replayedPieces > replayed, "a queued backend replays prompt pieces");
    }
  });

  test("prompts fed while none decodes share an idle chunk, and a newcomer's prompt beside a stream takes chunks of chunkTokens; each gives the teacher-forced logits", async (mamba) => {
    const model = mamba.model;
    const expected = SafetensorsFile.parse(
      await Deno.readFile(`${TINY}/expected.safetensors`),
      TINY,
    );
    const vocab = model.config.vocabSize;
    const sequences = [0, 1, 2].map((i) => expected.int32(`prompt${i}_greedy_ids`));
    const lastLogits = (i: number) => {
      const logits = expected.float32(`prompt${i}_logits`);
      return logits.subarray(logits.length - vocab);
    };
    // The warm-up at load may still be ending its engine's loop.
    while (engineFor(model).busy) await settled();
    const engine = engineFor(model, { chunkTokens: 16, idleChunkTokens: 200 });
    // 50, 57 and 56 ids: 163 rows, one idle chunk (chunks of 16 would take 11).
    let chunks = engine.stats.chunks;
    const sessions = sequences.map(() => new Session(model));
    const together = await Promise.all(sessions.map((s, i) => s.prefill(sequences[i])));
    assertEquals(engine.stats.chunks - chunks, 1, "one chunk for the three prompts");
    together.forEach((got, i) => {
      const diff = maxAbsDiff(got, lastLogits(i));
      assert(diff <= 1e-3, `prompt ${i} in the idle chunk: max abs diff ${diff}`);
    });
    for (const session of sessions) session.dispose();
    // While a stream decodes (long enough to outlast them), a newcomer's 57
    // ids go in chunks of 16 between its rounds.
    const { prompts, greedy } = await reference();
    const stream = mamba.generate(prompts[0], { temperature: 0, maxNewTokens: 200 });
    const streamIds: number[] = [];
    let late: Promise<Float32Array> | undefined;
    for await (const event of stream) {
      streamIds.push(event.token);
      if (streamIds.length === 1) {
        chunks = engine.stats.chunks;
        const session = new Session(model);
        late = session.prefill(sequences[1]).finally(() => session.dispose());
      }
    }
    const diff = maxAbsDiff(await late!, lastLogits(1));
    assert(diff <= 1e-3, `the newcomer's prompt: max abs diff ${diff}`);
    assertEquals(engine.stats.chunks - chunks, Math.ceil(57 / 16), "chunks of 16 beside a stream");
    assertEquals(streamIds.slice(0, 48), greedy[0]);
  });

  test("a snapshot taken mid-batch continues identically in a new session", async (mamba) => {
    const { prompts, greedy } = await reference();
    const model = mamba.model;
    // Three other streams keep the engine busy while stream 0 is saved and restored.
    const others = [1, 2, 3].map((i) =>
      mamba.generate(prompts[i % prompts.length], { temperature: 0, maxNewTokens: 48 })
    );
    const drained = others.map(async (generation) => {
      const ids: number[] = [];
      for await (const event of generation) ids.push(event.token);
      return ids;
    });
    const session = new Session(model);
    const head = await session.decode({
      prompt: prompts[0],
      sampler: new Sampler({ temperature: 0 }),
      maxTokens: 11,
    });
    const bytes = await session.snapshot();
    session.dispose();
    const restored = new Session(model, bytes);
    const tail = await restored.greedy(48 - 11);
    assertEquals([...head.ids, ...tail.ids], greedy[0]);
    restored.dispose();
    (await Promise.all(drained)).forEach((ids, i) =>
      assertEquals(ids, greedy[(i + 1) % prompts.length], `stream ${i + 1}`)
    );
  });
}

Deno.test({
  name:
    "[webgpu] a stream that starts as the last one ends gets an idle engine's short first round",
  ignore: !adapter,
  fn: async () => {
    const mamba = await loadModel(TINY, { backend: "webgpu" });
    try {
      const engine = engineFor(mamba.model);
      const { prompts, greedy } = await reference();
      /** Rounds the engine issues for one greedy stream of 6 ids, and the ids. */
      const stream = async () => {
        const rounds = engine.stats.rounds;
        const ids: number[] = [];
        const generation = mamba.generate(prompts[0], { maxNewTokens: 6, temperature: 0 });
        for await (const event of generation) ids.push(event.token);
        return { rounds: engine.stats.rounds - rounds, ids };
      };
      const idle = await stream();
      assertEquals(idle.ids, greedy[0].slice(0, 6));
      assert(idle.rounds >= 2, `a short first round, then the rest: ${idle.rounds} rounds`);
      // Started in the same turn as the last stream's end, while the engine's loop still runs,
      // the next stream has no one to share a long round with: it gets the same short first one.
      let next: Promise<{ rounds: number; ids: number[] }> | undefined;
      const rounds = engine.stats.rounds;
      const ids: number[] = [];
      for await (const event of mamba.generate(prompts[0], { maxNewTokens: 6, temperature: 0 })) {
        ids.push(event.token);
        if (ids.length === 6) next = stream();
      }
      assertEquals(ids, greedy[0].slice(0, 6));
      const following = await next!;
      assertEquals(engine.stats.rounds - rounds - following.rounds, idle.rounds);
      assertEquals(following, idle);
    } finally {
      mamba.dispose();
    }
  },
});

Deno.test("engine: rounds of 4 steps issued ahead of their read-back rewind to the exact id (js)", async () => {
  // The js backend made to run as a device would: pipelined rounds of four
  // steps, so sequences run past their ends and are rewound.
  const dir = `${SHARED}/fixtures/hf-oracle/odd-bf16`;
  const { config, weights } = await loadCheckpoint(dir);
  const model = new MambaModel(await createBackend("js"), config, weights);
  const engine = engineFor(model, { roundSteps: 4, pipelined: true });
  const expected = SafetensorsFile.parse(await Deno.readFile(`${dir}/expected.safetensors`), dir);
  const [batch, promptLen] = expected.info("input_ids").shape;
  const totalLen = expected.info("greedy_ids").shape[1];
  const inputIds = expected.int32("input_ids");
  const greedyIds = expected.int32("greedy_ids");
  const steps = totalLen - promptLen;
  const wanted = (
    row: number,
  ) => [...greedyIds.subarray(row * totalLen + promptLen, (row + 1) * totalLen)];
  const streams = Array.from({ length: 12 }, async (_, i) => {
    const row = i % batch;
    await new Promise((resolve) => setTimeout(resolve, 2 * i));
    const session = new Session(model);
    let judged = 0;
    // Streams end by length, before an id, and after an id, at various points.
    const stopAt = 1 + (i * 3) % steps;
    const result = await session.decode({
      prompt: inputIds.subarray(row * promptLen, (row + 1) * promptLen),
      sampler: new Sampler({ temperature: 0 }),
      maxTokens: i % 3 === 0 ? stopAt : steps,
      judge: () => {
        judged++;
        if (i % 3 === 1 && judged === stopAt) return "stop-before";
        if (i % 3 === 2 && judged === stopAt) return "stop-after";
        return "continue";
      },
    });
    const keep = i % 3 === 1 ? stopAt - 1 : stopAt;
    assertEquals(result.ids, wanted(row).slice(0, keep), `stream ${i}`);
    // The slot stands right after the kept ids: the next greedy ids follow on.
    const next = await session.greedy(steps - keep);
    assertEquals(next.ids, wanted(row).slice(keep), `stream ${i} continued`);
    session.dispose();
  });
  await Promise.all(streams);

  // Sampled streams stopping before an id: the ids and the samplers' states
  // are the host path's, as if the picks past the stop had never been drawn.
  const prompt = [...inputIds.subarray(0, promptLen)];
  const sampled = STREAM_OPTIONS.map(async (streamOptions, i) => {
    const { ids: want } = await hostPath(model, prompt, streamOptions, 12);
    const stopAt = 3 + i;
    const sampler = new Sampler(streamOptions);
    let judged = 0;
    const session = new Session(model);
    const result = await session.decode({
      prompt,
      sampler,
      maxTokens: 12,
      judge: () => ++judged === stopAt ? "stop-before" : "continue",
    });
    assertEquals(result, { ids: want.slice(0, stopAt - 1), stopped: true }, `stream ${i}`);
    session.dispose();
    const reference = new Sampler(streamOptions);
    if (reference.options.temperature > 0) reference.randoms(stopAt);
    assertEquals(sampler.state(), reference.state(), `stream ${i}'s sampler`);
  });
  await Promise.all(sampled);
  assert(engine.stats.rewinds > 0, "some sequences ran past their end");
  assert(engine.stats.rowSteps > engine.stats.steps, "rounds held several sequences");
  await assertRejects(
    () => new Session(model).greedy(1),
    RangeError,
    "prefill the session first",
  );
  engine.dispose();
});

Deno.test("engine: prepared batches record nothing more, and the least recently used recording goes first (js)", async () => {
  const { config, weights } = await loadCheckpoint(TINY);
  const backend = await createBackend("js");
  const model = new MambaModel(backend, config, weights);
  let captures = 0;
  const capture = backend.capture.bind(backend);
  backend.capture = (ops) => {
    captures++;
    return capture(ops);
  };
  const engine = engineFor(model, { keptRecordings: 9 });
  // The second call waits for the first, then finds everything recorded.
  await Promise.all([engine.prepare(6), engine.prepare(6)]);
  // A greedy step at batches 1 to 6; sampled ones at 1: top-k 40, none, and 40 with a penalty.
  assertEquals(captures, 9);
  const { prompts, greedy } = await reference();
  /** `count` streams of `options` that end one after the other; greedy ones checked. */
  const streams = (count: number, options: SamplingOptions) =>
    Promise.all(Array.from({ length: count }, async (_, i) => {
      const session = new Session(model);
      const result = await session.decode({
        prompt: prompts[i % prompts.length],
        sampler: new Sampler(options),
        maxTokens: 2 + 2 * i,
      });
      session.dispose();
      if (options.temperature === 0) {
        assertEquals(result.ids, greedy[i % prompts.length].slice(0, 2 + 2 * i), `stream ${i}`);
      }
    }));
  const sampled = (topK: number) => streams(1, { temperature: 0.8, topK, seed: 1 });
  // Rounds of 6, then 5, ... 1 streams (the js backend's rounds are one step): all recorded ahead.
  await streams(6, { temperature: 0 });
  await sampled(40);
  assertEquals(captures, 9, "every step was recorded ahead");
  // Least recently used first: the whole vocabulary's, the penalized one, batches 6 to 1, top-k 40.
  await sampled(5);
  assertEquals(captures, 10, "top-k 5 is recorded; the whole vocabulary's goes");
  await sampled(40);
  assertEquals(captures, 10, "top-k 40's is kept");
  await sampled(3);
  assertEquals(captures, 11, "top-k 3 is recorded; the penalized one goes");
  await streams(5, { temperature: 0 });
  assertEquals(captures, 11, "batches 5 to 1 are kept");
  await sampled(7);
  assertEquals(captures, 12, "top-k 7 is recorded; batch 6's goes");
  await streams(6, { temperature: 0 });
  assertEquals(captures, 13, "batch 6's is recorded again; top-k 5's goes");
  await sampled(40);
  assertEquals(captures, 13, "top-k 40's is kept");
  await sampled(5);
  assertEquals(captures, 14, "top-k 5's is recorded again");
  engine.dispose();
  backend.dispose();
});

Deno.test("activationFloatsPerRow counts the floats allocScratch takes (Mamba-1, Falcon-Mamba, Mamba-2)", async () => {
  const dirs = [
    TINY,
    `${SHARED}/fixtures/hf-oracle/falcon-mamba-tiny`,
    `${SHARED}/fixtures/mamba2/tiny-groups2`,
  ];
  for (const dir of dirs) {
    const { config, weights } = await loadCheckpoint(dir);
    const backend = await createBackend("js");
    const model = new MambaModel(backend, config, weights);
    // Counted once each, though the js backend's scratch takes its buffers from zeros.
    let floats = 0;
    let inScratch = false;
    const zeros = backend.zeros.bind(backend);
    const scratch = backend.scratch.bind(backend);
    backend.zeros = (length) => {
      if (!inScratch) floats += length;
      return zeros(length);
    };
    backend.scratch = (length) => {
      floats += length;
      inScratch = true;
      try {
        return scratch(length);
      } finally {
        inScratch = false;
      }
    };
    model.releaseScratch(model.allocScratch(7));
    assertEquals(floats, 7 * model.activationFloatsPerRow, dir);
    backend.dispose();
  }
});

Deno.test("the state pool hands out the lowest free slot, after releases and when it grows", async () => {
  const config = parseConfig({ d_model: 8, n_layer: 2, vocab_size: 16, d_state: 4 }, "config.json");
  const pool = new StatePool(await createBackend("js"), config);
  const first = Array.from({ length: pool.capacity }, () => pool.acquire());
  assertEquals(first, [0, 1, 2, 3]);
  pool.release(3);
  pool.release(1);
  assertEquals([pool.acquire(), pool.acquire()], [1, 3]);
  // Full: the pool doubles and hands out its new slots in order.
  assertEquals([pool.acquire(), pool.acquire()], [4, 5]);
  assertEquals(pool.capacity, 8);
  pool.release(0);
  pool.release(5);
  assertEquals([pool.acquire(), pool.acquire(), pool.acquire()], [0, 5, 6]);
  assertEquals(pool.used, 7);
  // Reserved ahead, it doubles as acquiring would; the slots in use stay.
  pool.reserve(20);
  assertEquals(pool.capacity, 32);
  assertEquals([pool.acquire(), pool.acquire()], [7, 8]);
  assertEquals(pool.used, 9);
});

Deno.test("engine: a burst of newcomers joins short rounds, a lone newcomer among decoding streams a full one (js)", async () => {
  // The js backend made to run as a device would, with the engine's own round lengths.
  const dir = `${SHARED}/fixtures/hf-oracle/odd-bf16`;
  const { config, weights } = await loadCheckpoint(dir);
  const model = new MambaModel(await createBackend("js"), config, weights);
  const engine = engineFor(model, { pipelined: true });
  const expected = SafetensorsFile.parse(await Deno.readFile(`${dir}/expected.safetensors`), dir);
  const [, promptLen] = expected.info("input_ids").shape;
  const totalLen = expected.info("greedy_ids").shape[1];
  const prompt = expected.int32("input_ids").subarray(0, promptLen);
  const want = [...expected.int32("greedy_ids").subarray(promptLen, totalLen)];
  const running: Promise<void>[] = [];
  /** Starts a greedy stream; `onPick(n)` runs once its n-th pick is judged. */
  const start = (onPick: (n: number) => void) => {
    running.push((async () => {
      const session = new Session(model);
      let picks = 0;
      const { ids } = await session.decode({
        prompt,
        sampler: new Sampler({ temperature: 0 }),
        maxTokens: 200,
        judge: () => {
          onPick(++picks);
          return "continue";
        },
      });
      session.dispose();
      assertEquals(ids.slice(0, want.length), want);
    })());
  };
  /** Starts a stream now and notes the steps issued until its first pick is judged. */
  const newcomer = (steps: number[]) => {
    const before = engine.stats.steps;
    start((n) => n === 1 && steps.push(engine.stats.steps - before));
  };
  const burst: number[] = [];
  start((n) => {
    // Two newcomers beside one decoding stream: at least half of their rounds wait for first ids.
    if (n === 1) { for (let i = 0; i < 2; i++) newcomer(burst); }
  });
  /** Waits for every stream, those started meanwhile included. */
  const finish = async () => {
    while (running.length > 0) await Promise.all(running.splice(0));
  };
  await finish();
  const lone: number[] = [];
  // Three streams well into decoding, then one newcomer.
  for (let i = 0; i < 3; i++) start((n) => i === 0 && n === 40 && newcomer(lone));
  await finish();
  assertEquals(burst.length, 2);
  assertEquals(lone.length, 1);
  // Each waits for the round in flight when it joins, then its own, which is short for the burst.
  for (const steps of burst) assert(steps < lone[0], `burst ${burst}, lone ${lone}`);
});
