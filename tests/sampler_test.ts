/**
 * The sampler on crafted logits: greedy, repetition penalty, top-k, top-p,
 * min-p, seeding, state save/restore, empirical frequencies, and option checks.
 */

import {
  assert,
  assertAlmostEquals,
  assertEquals,
  assertNotEquals,
  assertThrows,
} from "@std/assert";
import { Sampler, type SamplingOptions, validateSamplingOptions } from "../src/sampler.ts";

/** Everything off but what a test turns on. */
const PLAIN = { temperature: 1, topK: 0, topP: 1, minP: 0, seed: 1 } as const;

/** Logits whose softmax at temperature 1 is `probs`. */
const fromProbs = (probs: number[]) => new Float32Array(probs.map(Math.log));

/** Deterministic pseudo-random logits (a small LCG), `n` of them, roughly N(0, scale). */
function randomLogits(n: number, seed: number, scale = 3): Float32Array {
  let x = seed >>> 0;
  const next = () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (next() + next() + next() - 1.5) * 2 * scale;
  return out;
}

function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** Draws `n` ids and counts them. */
function counts(sampler: Sampler, logits: Float32Array, n: number, history: number[] = []) {
  const seen = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    const id = sampler.sample(logits, history);
    seen.set(id, (seen.get(id) ?? 0) + 1);
  }
  return seen;
}

const sortedKeys = (map: Map<number, number>) => [...map.keys()].sort((a, b) => a - b);

Deno.test("defaults follow llama.cpp, with a random integer seed", () => {
  const { seed, ...rest } = new Sampler().options;
  assertEquals(rest, {
    temperature: 0.8,
    topK: 40,
    topP: 0.95,
    minP: 0.05,
    repetitionPenalty: 1,
    repeatLastN: 64,
  });
  assert(Number.isSafeInteger(seed) && seed >= 0);
  assertEquals(new Sampler({ seed: 5 }).options.seed, 5);
});

Deno.test("greedy picks the argmax, the lowest id on ties, and draws no random number", () => {
  const sampler = new Sampler({ temperature: 0, seed: 3 });
  const state = sampler.state();
  assertEquals(sampler.sample(new Float32Array([0.1, 2.5, -1, 2.4]), []), 1);
  assertEquals(sampler.sample(new Float32Array([1, 3, 3, 2]), []), 1);
  assertEquals(sampler.sample(new Float32Array([-Infinity, -5, NaN, -Infinity]), []), 1);
  assertEquals(sampler.sample(new Float32Array([NaN, 0, Infinity, Infinity]), []), 2);
  const logits = randomLogits(50_277, 9);
  assertEquals(sampler.sample(logits, []), argmax(logits));
  assertEquals(sampler.state(), state);
});

Deno.test("no candidate at all is a RangeError", () => {
  for (const temperature of [0, 1]) {
    const sampler = new Sampler({ ...PLAIN, temperature });
    assertThrows(
      () => sampler.sample(new Float32Array([-Infinity, NaN]), []),
      RangeError,
      "No token can be sampled",
    );
    assertThrows(() => sampler.sample(new Float32Array(0), []), RangeError);
  }
});

Deno.test("-Infinity and NaN logits are never sampled", () => {
  const logits = new Float32Array([-Infinity, 0, NaN, 0.5, -Infinity]);
  for (const options of [PLAIN, { ...PLAIN, topK: 3 }, { ...PLAIN, topP: 0.99 }]) {
    assertEquals(sortedKeys(counts(new Sampler(options), logits, 500)), [1, 3]);
  }
});

Deno.test("repetition penalty divides positive logits, multiplies negative ones", () => {
  const greedy = (options: SamplingOptions, logits: number[], history: number[]) =>
    new Sampler({ temperature: 0, ...options }).sample(new Float32Array(logits), history);
  // Positive: 2 / 2 = 1 falls below 1.5.
  assertEquals(greedy({}, [2, 1.5, -3], [0]), 0);
  assertEquals(greedy({ repetitionPenalty: 2 }, [2, 1.5, -3], [0]), 1);
  // Negative: -1 * 1.5 = -1.5 falls below -1.2.
  assertEquals(greedy({ repetitionPenalty: 1.5 }, [-1, -1.2, -3], []), 0);
  assertEquals(greedy({ repetitionPenalty: 1.5 }, [-1, -1.2, -3], [0]), 1);
  // A penalty below 1 rewards repeats.
  assertEquals(greedy({ repetitionPenalty: 0.5 }, [1, 1.5], [0]), 0);
  // Once per distinct id: 2 / 2 = 1 (not 2 / 8) still beats 0.9.
  assertEquals(greedy({ repetitionPenalty: 2 }, [2, 0.9], [0, 0, 0]), 0);
});

Deno.test("repetition penalty looks back repeatLastN ids only", () => {
  const logits = new Float32Array([2, 1.5, -3, -3]);
  const history = [0, 3, 3, 3];
  const greedy = (repeatLastN: number) =>
    new Sampler({ temperature: 0, repetitionPenalty: 2, repeatLastN }).sample(logits, history);
  assertEquals(greedy(3), 0, "id 0 is 4 back");
  assertEquals(greedy(4), 1);
  assertEquals(greedy(64), 1);
  assertEquals(greedy(-1), 1, "-1 is the whole history");
  assertEquals(greedy(0), 0, "0 is off");
  assertThrows(
    () => new Sampler({ repetitionPenalty: 2 }).sample(logits, [7]),
    RangeError,
    "History id 7 is outside the logits",
  );
});

Deno.test("the caller's logits are never modified", () => {
  const logits = randomLogits(1000, 4);
  const copy = logits.slice();
  const history = Array.from({ length: 100 }, (_, i) => (i * 37) % 1000);
  for (const options of [{ temperature: 0 }, {}, { topK: 0, topP: 0.5 }, { topK: 0, topP: 1 }]) {
    const sampler = new Sampler({ ...options, repetitionPenalty: 1.3, seed: 2 });
    for (let i = 0; i < 20; i++) sampler.sample(logits, history);
  }
  assertEquals(logits, copy);
});

Deno.test("topK 1 is greedy at any temperature", () => {
  for (const temperature of [0.01, 0.7, 1, 5, 1000]) {
    for (let t = 0; t < 5; t++) {
      const logits = randomLogits(5000, 100 * t + 1);
      const sampler = new Sampler({ temperature, topK: 1, topP: 1, minP: 0, seed: t });
      for (let i = 0; i < 20; i++) assertEquals(sampler.sample(logits, []), argmax(logits));
    }
  }
});

Deno.test("topK 2 only ever returns the two largest", () => {
  const logits = new Float32Array([0.3, 2, -1, 1.9, 1.8, 0]);
  const seen = counts(new Sampler({ ...PLAIN, topK: 2, temperature: 5 }), logits, 1000);
  assertEquals(sortedKeys(seen), [1, 3]);
  // Ties go to the lower ids.
  const flat = new Float32Array(8).fill(1);
  assertEquals(sortedKeys(counts(new Sampler({ ...PLAIN, topK: 2 }), flat, 1000)), [0, 1]);
});

Deno.test("topP keeps the smallest set whose mass reaches p", () => {
  const probs = [0.5, 0.3, 0.15, 0.05];
  // The same distribution with the ids shuffled.
  const shuffled = [0.15, 0.05, 0.3, 0.5];
  for (const topK of [0, 3, 10]) {
    const sample = (values: number[], topP: number) =>
      sortedKeys(counts(new Sampler({ ...PLAIN, topK, topP }), fromProbs(values), 1000));
    assertEquals(sample(probs, 0.7), [0, 1]);
    assertEquals(sample(shuffled, 0.7), [2, 3]);
    assertEquals(sample(probs, 0.45), [0]);
    assertEquals(sample(probs, 0.85), [0, 1, 2]);
    assertEquals(sample(shuffled, 0.9), [0, 2, 3]);
    assertEquals(sample(probs, 1), topK === 3 ? [0, 1, 2] : [0, 1, 2, 3]);
  }
});

Deno.test("minP drops tokens below minP times the top probability", () => {
  const logits = fromProbs([0.5, 0.3, 0.15, 0.05]);
  const sample = (options: SamplingOptions) =>
    sortedKeys(counts(new Sampler({ ...PLAIN, ...options }), logits, 2000));
  assertEquals(sample({ minP: 0.05 }), [0, 1, 2, 3]);
  assertEquals(sample({ minP: 0.2 }), [0, 1, 2]); // 0.05 < 0.1
  assertEquals(sample({ minP: 0.5 }), [0, 1]); // 0.15 < 0.25
  assertEquals(sample({ minP: 1 }), [0]);
  // After top-p: the stricter of the two wins.
  assertEquals(sample({ minP: 0.5, topP: 0.99 }), [0, 1]);
  assertEquals(sample({ minP: 0.2, topP: 0.7 }), [0, 1]);
  assertEquals(sample({ minP: 0.2, topP: 0.7, topK: 3 }), [0, 1]);
});

Deno.test("on a 50k vocabulary, draws stay inside a full-sort reference's kept set", () => {
  const n = 50_277;
  const logits = randomLogits(n, 77, 4);
  const cases: SamplingOptions[] = [
    {},
    { topK: 0 },
    { topK: 0, minP: 0 },
    { topK: 0, minP: 0, topP: 0.5 },
    { topK: 1000, minP: 0, topP: 0.9 },
    { topK: 0, topP: 1, minP: 0.3 },
  ];
  for (const options of cases) {
    const sampler = new Sampler({ ...options, seed: 11 });
    const { temperature, topK, topP, minP } = sampler.options;
    // Reference: sort everything.
    let order = Array.from({ length: n }, (_, i) => i)
      .sort((a, b) => logits[b] - logits[a] || a - b);
    if (topK > 0) order = order.slice(0, topK);
    const weights = order.map((i) => Math.exp((logits[i] - logits[order[0]]) / temperature));
    const total = weights.reduce((a, b) => a + b, 0);
    let keep = order.length;
    let mass = 0;
    for (let j = 0; j < order.length; j++) {
      if (weights[j] < minP) {
        keep = j;
        break;
      }
      mass += weights[j];
      if (topP < 1 && mass >= topP * total) {
        keep = j + 1;
        break;
      }
    }
    const kept = new Set(order.slice(0, keep));
    const seen = counts(sampler, logits, 300);
    for (const id of seen.keys()) assert(kept.has(id), `${JSON.stringify(options)}: ${id}`);
    if (keep > 1) assert(seen.size > 1, `${JSON.stringify(options)} samples more than one id`);
  }
});

Deno.test("empirical frequencies match the softmax", () => {
  const logits = new Float32Array([1, 0.5, 0, -0.5, -1, 2, -Infinity]);
  const draws = 40_000;
  for (const temperature of [1, 0.5, 2]) {
    const seen = counts(new Sampler({ ...PLAIN, temperature, seed: 123 }), logits, draws);
    const exps = [...logits].map((l) => Math.exp(l / temperature));
    const z = exps.reduce((a, b) => a + b, 0);
    exps.forEach((e, id) => {
      assertAlmostEquals((seen.get(id) ?? 0) / draws, e / z, 0.01, `id ${id} at ${temperature}`);
    });
  }
});

Deno.test("the same seed repeats, another seed differs", () => {
  const logits = randomLogits(2000, 5, 1);
  const run = (seed: number) => {
    const sampler = new Sampler({ seed });
    return Array.from({ length: 200 }, () => sampler.sample(logits, []));
  };
  assertEquals(run(42), run(42));
  assertNotEquals(run(42), run(43));
  assertNotEquals(run(0), run(2 ** 32)); // the high bits of a seed count too
  assertEquals(new Sampler({ seed: 7 }).state(), new Sampler({ seed: 7 }).state());
});

Deno.test("state() and restore() resume a run identically", () => {
  const logits = randomLogits(3000, 6, 1);
  const history: number[] = [];
  const sampler = new Sampler({ seed: 99, repetitionPenalty: 1.1 });
  for (let i = 0; i < 50; i++) history.push(sampler.sample(logits, history));
  const saved = sampler.state();
  const savedHistory = [...history];
  const tail: number[] = [];
  for (let i = 0; i < 50; i++) {
    const id = sampler.sample(logits, history);
    history.push(id);
    tail.push(id);
  }
  const resumed = new Sampler({ seed: 1, repetitionPenalty: 1.1 });
  resumed.restore(saved);
  const resumedTail: number[] = [];
  for (let i = 0; i < 50; i++) {
    const id = resumed.sample(logits, savedHistory);
    savedHistory.push(id);
    resumedTail.push(id);
  }
  assertEquals(resumedTail, tail);
  assertEquals(resumed.state(), sampler.state());
  // state() is a copy.
  saved[0] ^= 1;
  assertEquals(resumed.state(), sampler.state());
});

Deno.test("restore() refuses a malformed state", () => {
  const sampler = new Sampler({ seed: 1 });
  for (
    const state of [[1, 2, 3], [0, 0, 0, 0], [1, 2, 3, 2 ** 32], [1, 2, 3, -1], [1, 2, 3, 0.5]]
  ) {
    assertThrows(() => sampler.restore(state), RangeError, "A sampler state must be");
  }
});

Deno.test("invalid options are RangeErrors with clear messages", () => {
  const bad: [SamplingOptions, string][] = [
    [{ temperature: NaN }, "Sampling option temperature must be a number, got NaN"],
    [{ temperature: -0.1 }, "Sampling option temperature must be a finite number of 0 or more"],
    [{ temperature: Infinity }, "Sampling option temperature must be"],
    [{ topK: 1.5 }, "Sampling option topK must be an integer of 0 or more"],
    [{ topK: -1 }, "Sampling option topK must be"],
    [{ topP: 0 }, "Sampling option topP must be more than 0 and at most 1"],
    [{ topP: 1.01 }, "Sampling option topP must be"],
    [{ topP: NaN }, "Sampling option topP must be a number, got NaN"],
    [{ minP: -0.01 }, "Sampling option minP must be between 0 and 1"],
    [{ minP: 1.5 }, "Sampling option minP must be"],
    [{ repetitionPenalty: 0 }, "Sampling option repetitionPenalty must be a finite number above 0"],
    [{ repetitionPenalty: -1 }, "Sampling option repetitionPenalty must be"],
    [{ repeatLastN: -2 }, "Sampling option repeatLastN must be an integer of 0 or more, or -1"],
    [{ repeatLastN: 2.5 }, "Sampling option repeatLastN must be"],
    [{ seed: 1.5 }, "Sampling option seed must be an integer"],
    [{ seed: -1 }, "Sampling option seed must be"],
    [{ seed: NaN }, "Sampling option seed must be"],
    [{ temperature: "1" as unknown as number }, "must be a number, got string"],
  ];
  for (const [options, message] of bad) {
    assertThrows(() => validateSamplingOptions(options), RangeError, message);
    assertThrows(() => new Sampler(options), RangeError, message);
  }
  // Boundaries that are allowed.
  validateSamplingOptions({ temperature: 0, topK: 0, topP: 1, minP: 0, repeatLastN: -1, seed: 0 });
  validateSamplingOptions({ minP: 1, topP: 1e-9, seed: Number.MAX_SAFE_INTEGER });
});
