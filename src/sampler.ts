/**
 * Token sampling with llama.cpp's options and defaults, driven by a small
 * seeded PRNG (xoshiro128**, seeded through splitmix32) whose state can be
 * saved and restored, so a sampling run can be snapshotted and resumed
 * identically.
 *
 * The steps, in order:
 *
 * 1. **Repetition penalty** over the last `repeatLastN` ids of the history
 *    (all of it for -1, none for 0), once per distinct id: a positive logit is
 *    divided by `repetitionPenalty`, a negative one multiplied by it.
 * 2. **Greedy** when `temperature` is 0: the largest logit wins (the lowest id
 *    on ties) and no random number is drawn.
 * 3. **Top-k**: keep the `topK` largest logits (0 keeps all), ties going to
 *    the lower id.
 * 4. **Temperature**: divide the logits by `temperature`.
 * 5. **Softmax** over what is left.
 * 6. **Top-p**: keep the smallest set of most likely tokens whose
 *    probability reaches `topP` (1 keeps all).
 * 7. **Min-p**: drop tokens whose probability is below `minP` times the top
 *    one's (0 keeps all).
 * 8. **Renormalise** and **draw** one token, consuming exactly one random
 *    number (53 bits) per non-greedy sample.
 *
 * This is transformers' order (top-k does not depend on the temperature, so
 * it commutes with it). Logits that are -Infinity or NaN are never sampled.
 * The caller's logits are never modified, and the whole vocabulary is never
 * sorted: top-k uses a bounded heap, top-p sorts only the tokens above a
 * probability threshold that already holds enough mass.
 *
 * @example Seeded sampling, snapshotted and resumed
 * ```ts
 * import { Sampler } from "./sampler.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const logits = new Float32Array([2, 1, 0.5, -1]);
 * const sampler = new Sampler({ temperature: 1, seed: 42 });
 * const first = sampler.sample(logits, []);
 * const saved = sampler.state();
 * const next = sampler.sample(logits, [first]);
 *
 * const resumed = new Sampler({ temperature: 1, seed: 42 });
 * resumed.restore(saved);
 * assertEquals(resumed.sample(logits, [first]), next);
 * ```
 *
 * @module
 */

/** Sampling options; names and defaults follow llama.cpp. */
export interface SamplingOptions {
  /** Softmax temperature; 0 is greedy (default 0.8). */
  temperature?: number;
  /** Keep only the k most likely tokens; 0 is off (default 40). */
  topK?: number;
  /** Nucleus sampling: keep the smallest set whose probability reaches p; 1 is off (default 0.95). */
  topP?: number;
  /** Drop tokens below minP times the top probability; 0 is off (default 0.05). */
  minP?: number;
  /** Repetition penalty; 1 is off (default 1). */
  repetitionPenalty?: number;
  /** History ids the repetition penalty looks at; -1 is all, 0 none (default 64). */
  repeatLastN?: number;
  /** Seed of the random generator, a non-negative integer (default: a random one). */
  seed?: number;
}

/** llama.cpp's defaults, except the seed, which is random unless given. */
export const SAMPLING_DEFAULTS = {
  temperature: 0.8,
  topK: 40,
  topP: 0.95,
  minP: 0.05,
  repetitionPenalty: 1,
  repeatLastN: 64,
} as const;

function check(ok: boolean, name: string, rule: string, value: unknown): void {
  if (!ok) throw new RangeError(`Sampling option ${name} must be ${rule}, got ${String(value)}`);
}

/**
 * Fills in the defaults and checks every option; a missing seed becomes a
 * random one, so the returned options always reproduce the run.
 *
 * @throws {RangeError} For an option out of range, NaN, or of the wrong type.
 */
export function validateSamplingOptions(options: SamplingOptions = {}): Required<SamplingOptions> {
  const pick = (name: keyof typeof SAMPLING_DEFAULTS): number => {
    const value = options[name] ?? SAMPLING_DEFAULTS[name];
    if (typeof value !== "number" || Number.isNaN(value)) {
      throw new RangeError(
        `Sampling option ${name} must be a number, got ${
          typeof value === "number" ? "NaN" : typeof value
        }`,
      );
    }
    return value;
  };
  const temperature = pick("temperature");
  check(
    Number.isFinite(temperature) && temperature >= 0,
    "temperature",
    "a finite number of 0 or more (0 is greedy)",
    temperature,
  );
  const topK = pick("topK");
  check(
    Number.isSafeInteger(topK) && topK >= 0,
    "topK",
    "an integer of 0 or more (0 is off)",
    topK,
  );
  const topP = pick("topP");
  check(topP > 0 && topP <= 1, "topP", "more than 0 and at most 1 (1 is off)", topP);
  const minP = pick("minP");
  check(minP >= 0 && minP <= 1, "minP", "between 0 and 1 (0 is off)", minP);
  const repetitionPenalty = pick("repetitionPenalty");
  check(
    Number.isFinite(repetitionPenalty) && repetitionPenalty > 0,
    "repetitionPenalty",
    "a finite number above 0 (1 is off)",
    repetitionPenalty,
  );
  const repeatLastN = pick("repeatLastN");
  check(
    Number.isSafeInteger(repeatLastN) && repeatLastN >= -1,
    "repeatLastN",
    "an integer of 0 or more, or -1 for the whole history",
    repeatLastN,
  );
  let seed = options.seed;
  if (seed === undefined) {
    seed = crypto.getRandomValues(new Uint32Array(1))[0];
  } else {
    check(
      typeof seed === "number" && Number.isSafeInteger(seed) && seed >= 0,
      "seed",
      "an integer from 0 to 2^53 - 1 (leave it out for a random seed)",
      seed,
    );
  }
  return { temperature, topK, topP, minP, repetitionPenalty, repeatLastN, seed };
}

/** Whether the repetition penalty of these options changes any logit: on, over some ids. */
export function penalizes(options: Readonly<Required<SamplingOptions>>): boolean {
  return options.repetitionPenalty !== 1 && options.repeatLastN !== 0;
}

/** splitmix32's output function, used to expand a seed into xoshiro's state. */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x21f0aaad);
  x = Math.imul(x ^ (x >>> 15), 0x735a2d97);
  return (x ^ (x >>> 15)) >>> 0;
}

/** xoshiro128** state for a seed of up to 53 bits, expanded with splitmix32. */
function seedState(seed: number): Uint32Array {
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 0x1_0000_0000) >>> 0;
  let x = (lo ^ mix32(hi ^ 0x6a09e667)) >>> 0;
  const state = new Uint32Array(4);
  for (let i = 0; i < 4; i++) {
    x = (x + 0x9e3779b9) >>> 0;
    state[i] = mix32(x);
  }
  if ((state[0] | state[1] | state[2] | state[3]) === 0) state[0] = 1;
  return state;
}

/**
 * Scratch arrays of {@link pickToken}, grown on demand: one per caller that
 * picks repeatedly (a {@link Sampler}, a backend), so that picking allocates
 * nothing.
 */
export class PickScratch {
  /** Candidate ids. */
  ids: Int32Array = new Int32Array(0);
  /** Candidate weights (probabilities before normalising). */
  weights: Float64Array = new Float64Array(0);
  /** The top-k heap's ids. */
  heapIds: Int32Array = new Int32Array(0);
  /** The top-k heap's logits. */
  heapValues: Float64Array = new Float64Array(0);

  /** Ensures the candidate buffers hold `n`; returns the id buffer. */
  candidates(n: number): Int32Array {
    if (this.ids.length < n) {
      this.ids = new Int32Array(n);
      this.weights = new Float64Array(n);
    }
    return this.ids;
  }
}

/**
 * The id that {@link Sampler.sample} picks from `logits` with `options`, or
 * -1 where no logit can be picked (all -Infinity or NaN), calling `random`
 * for its one random number in [0, 1) only where it draws (a temperature
 * above 0 and some candidate). This is the whole sampling arithmetic, so
 * that a backend can pick with numbers drawn ahead of time.
 *
 * @param logits One logit per id; never modified.
 * @param history The ids so far, oldest first, for the repetition penalty.
 * @param limit Only ids below it are candidates.
 * @throws {RangeError} When a history id is outside the logits.
 */
export function pickToken(
  logits: Float32Array,
  history: ArrayLike<number>,
  limit: number,
  options: Readonly<Required<SamplingOptions>>,
  random: () => number,
  scratch: PickScratch = new PickScratch(),
): number {
  const { temperature, topK, topP, minP } = options;
  const values = penalized(logits, history, options);
  const n = Math.min(limit, values.length);

  if (temperature === 0) return firstLargest(values, n);

  // Candidates (ids, logits) after top-k; `sorted` when in descending order.
  let count: number;
  let sorted = false;
  if (topK > 0 && topK < n) {
    count = selectTopK(values, n, topK, scratch);
    sorted = true;
  } else {
    const ids = scratch.candidates(n);
    count = 0;
    for (let i = 0; i < n; i++) if (values[i] > -Infinity) ids[count++] = i;
  }
  if (count === 0) return -1;
  const ids = scratch.ids;
  const weights = scratch.weights;

  // Temperature and softmax, as weights relative to the top token (which gets 1).
  let max = -Infinity;
  for (let j = 0; j < count; j++) max = Math.max(max, values[ids[j]]);
  let total = 0;
  for (let j = 0; j < count; j++) {
    const v = values[ids[j]];
    const w = max === Infinity ? (v === Infinity ? 1 : 0) : Math.exp((v - max) / temperature);
    weights[j] = w;
    total += w;
  }

  // Top-p and min-p: the kept tokens are the first `count` of the candidates.
  if (topP < 1) {
    if (!sorted) {
      count = mostLikely(count, minP, topP * total, scratch);
    }
    const target = topP * total;
    let mass = 0;
    for (let j = 0; j < count; j++) {
      if (weights[j] < minP) {
        count = j;
        break;
      }
      mass += weights[j];
      if (mass >= target) {
        count = j + 1;
        break;
      }
    }
  } else if (minP > 0) {
    let kept = 0;
    for (let j = 0; j < count; j++) {
      if (weights[j] >= minP) {
        ids[kept] = ids[j];
        weights[kept++] = weights[j];
      }
    }
    count = kept;
  }

  // Renormalise and draw.
  let sum = 0;
  for (let j = 0; j < count; j++) sum += weights[j];
  let r = random() * sum;
  let last = ids[0];
  for (let j = 0; j < count; j++) {
    const w = weights[j];
    if (w <= 0) continue;
    if (r < w) return ids[j];
    r -= w;
    last = ids[j];
  }
  return last; // rounding left r just past the end
}

/** The logits with the repetition penalty applied: the caller's array, or a penalized copy. */
function penalized(
  logits: Float32Array,
  history: ArrayLike<number>,
  options: Readonly<Required<SamplingOptions>>,
): Float32Array {
  const { repetitionPenalty: penalty, repeatLastN } = options;
  if (!penalizes(options) || history.length === 0) return logits;
  const start = repeatLastN < 0 ? 0 : Math.max(0, history.length - repeatLastN);
  const seen = new Set<number>();
  let out: Float32Array | undefined;
  for (let k = start; k < history.length; k++) {
    const id = history[k];
    if (seen.has(id)) continue;
    seen.add(id);
    if (!Number.isInteger(id) || id < 0 || id >= logits.length) {
      throw new RangeError(
        `History id ${id} is outside the logits, which cover ids 0 to ${logits.length - 1}`,
      );
    }
    out ??= logits.slice();
    const v = out[id];
    out[id] = v > 0 ? v / penalty : v * penalty;
  }
  return out ?? logits;
}

/**
 * Puts the k largest logits' ids into the candidate buffer, largest first
 * (lower id first on ties); returns how many there are (fewer than k when
 * fewer logits can be sampled). A bounded min-heap: O(n log k).
 */
function selectTopK(values: Float32Array, n: number, k: number, scratch: PickScratch): number {
  if (scratch.heapIds.length < k) {
    scratch.heapIds = new Int32Array(k);
    scratch.heapValues = new Float64Array(k);
  }
  const { heapIds, heapValues } = scratch;
  // The root is the worst kept candidate: the lowest value, the highest id on ties.
  const worse = (a: number, b: number) =>
    heapValues[a] < heapValues[b] || (heapValues[a] === heapValues[b] && heapIds[a] > heapIds[b]);
  const swap = (a: number, b: number) => {
    const id = heapIds[a];
    heapIds[a] = heapIds[b];
    heapIds[b] = id;
    const v = heapValues[a];
    heapValues[a] = heapValues[b];
    heapValues[b] = v;
  };
  let size = 0;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (!(v > -Infinity)) continue; // -Infinity and NaN are never candidates
    if (size < k) {
      heapIds[size] = i;
      heapValues[size] = v;
      let c = size++;
      while (c > 0) {
        const parent = (c - 1) >> 1;
        if (!worse(c, parent)) break;
        swap(c, parent);
        c = parent;
      }
    } else if (v > heapValues[0]) {
      // Ids arrive in increasing order, so a tie with the root never displaces it.
      heapIds[0] = i;
      heapValues[0] = v;
      let p = 0;
      for (;;) {
        const l = 2 * p + 1;
        const r = l + 1;
        let m = p;
        if (l < size && worse(l, m)) m = l;
        if (r < size && worse(r, m)) m = r;
        if (m === p) break;
        swap(p, m);
        p = m;
      }
    }
  }
  const order = Array.from({ length: size }, (_, j) => j).sort((a, b) =>
    heapValues[b] - heapValues[a] || heapIds[a] - heapIds[b]
  );
  const ids = scratch.candidates(Math.max(size, 1));
  for (let j = 0; j < size; j++) ids[j] = heapIds[order[j]];
  return size;
}

/**
 * Reorders the first `count` candidates so that the most likely ones come
 * first, sorted (weight descending, lower id first on ties), and returns how
 * many are sorted: all tokens above a probability threshold whose mass
 * already reaches `target`, or all tokens at or above `minP` (relative to
 * the top one) if those do not reach it. Only those few are sorted.
 */
function mostLikely(count: number, minP: number, target: number, scratch: PickScratch): number {
  const { ids, weights } = scratch;
  let threshold = Math.max(minP, 1e-3);
  for (;;) {
    let mass = 0;
    for (let j = 0; j < count; j++) {
      if (weights[j] >= threshold && weights[j] > 0) mass += weights[j];
    }
    if (mass >= target || threshold <= minP || threshold === 0) break;
    threshold = threshold > 1e-12 ? Math.max(minP, threshold * 1e-3) : minP;
  }
  const kept: number[] = [];
  for (let j = 0; j < count; j++) {
    if (weights[j] >= threshold && weights[j] > 0) kept.push(j);
  }
  kept.sort((a, b) => weights[b] - weights[a] || ids[a] - ids[b]);
  const keptIds = kept.map((j) => ids[j]);
  const keptWeights = kept.map((j) => weights[j]);
  ids.set(keptIds);
  weights.set(keptWeights);
  return kept.length;
}

/**
 * Samples token ids from logits. One instance carries the random state of
 * one generation; {@link Sampler.state} and {@link Sampler.restore} save and
 * resume it.
 */
export class Sampler {
  /** The validated options, defaults filled in (the seed too, even a random one). */
  readonly options: Readonly<Required<SamplingOptions>>;

  readonly #s: Uint32Array;
  readonly #scratch = new PickScratch();

  /**
   * Validates the options and seeds the random generator.
   *
   * @param options Sampling options; see {@link SamplingOptions} for the defaults.
   * @throws {RangeError} For invalid options (see {@link validateSamplingOptions}).
   */
  constructor(options: SamplingOptions = {}) {
    this.options = Object.freeze(validateSamplingOptions(options));
    this.#s = seedState(this.options.seed);
  }

  /**
   * Picks the next id (see {@link pickToken}), drawing one random number
   * unless the temperature is 0.
   *
   * @param logits One logit per id; never modified.
   * @param history Every id so far (prompt and generated), for the repetition penalty.
   * @param limit Only ids below it are candidates (default: all): rows past a
   *   tokenizer's vocabulary (embedding padding) are never sampled.
   * @throws {RangeError} When no logit can be sampled (all -Infinity or NaN), or
   *   a history id is outside the logits.
   */
  sample(logits: Float32Array, history: readonly number[], limit = logits.length): number {
    const id = pickToken(logits, history, limit, this.options, () => this.#random(), this.#scratch);
    if (id < 0) throw noCandidate(Math.min(limit, logits.length));
    return id;
  }

  /**
   * The random numbers in [0, 1) that the next `count` calls of
   * {@link Sampler.sample} at a temperature above 0 would draw, one each;
   * the state advances as those calls would advance it. A backend that
   * samples ahead of the host takes them.
   */
  randoms(count: number): Float64Array {
    return Float64Array.from({ length: count }, () => this.#random());
  }

  /** The PRNG state: four unsigned 32-bit integers. */
  state(): number[] {
    return Array.from(this.#s);
  }

  /**
   * Restores a state from {@link Sampler.state}; sampling then continues
   * exactly as it would have from where it was saved.
   *
   * @throws {RangeError} Unless `state` is four unsigned 32-bit integers, not all 0.
   */
  restore(state: number[]): void {
    const ok = Array.isArray(state) && state.length === 4 &&
      state.every((x) => Number.isInteger(x) && x >= 0 && x <= 0xffffffff) &&
      state.some((x) => x !== 0);
    if (!ok) {
      throw new RangeError(
        `A sampler state must be four unsigned 32-bit integers, not all 0, got ${
          JSON.stringify(state)
        }`,
      );
    }
    this.#s.set(state);
  }

  /** A float in [0, 1) with 53 random bits, from two xoshiro128** outputs. */
  #random(): number {
    const a = this.#next() >>> 5;
    const b = this.#next() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }

  /** One xoshiro128** output. */
  #next(): number {
    const s = this.#s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/**
 * The greedy choice: the lowest id holding the largest of `values[0, limit)`.
 * -Infinity and NaN are never chosen.
 *
 * @throws {RangeError} When every value is -Infinity or NaN.
 */
export function argmax(values: Float32Array, limit = values.length): number {
  const best = firstLargest(values, limit);
  if (best < 0) throw noCandidate(limit);
  return best;
}

/** The lowest id holding the largest of `values[0, limit)`, or -1 where all are -Infinity or NaN. */
function firstLargest(values: Float32Array, limit: number): number {
  let best = -1;
  let bestValue = -Infinity;
  for (let i = 0; i < limit; i++) {
    if (values[i] > bestValue) {
      best = i;
      bestValue = values[i];
    }
  }
  return best;
}

function noCandidate(n: number): RangeError {
  return new RangeError(
    `No token can be sampled: all ${n} logits are -Infinity or NaN`,
  );
}
