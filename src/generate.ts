/**
 * Streaming text generation: prefill the prompt, then sample, step and decode
 * one token at a time, yielding each token with the text it completes.
 *
 * @module
 */

import type { StepBatcher } from "./batcher.ts";
import { Sampler, samplesTopK, type SamplingOptions } from "./sampler.ts";
import type { Session } from "./session.ts";
import { type MambaTokenizer, StreamingDecoder } from "./tokenizer.ts";

/** Tokens {@link generate} produces at most when `maxNewTokens` is not given. */
export const DEFAULT_MAX_NEW_TOKENS = 128;

/** Options of {@link generate}; sampling options follow llama.cpp's names and defaults. */
export interface GenerateOptions extends SamplingOptions {
  /** Tokens to generate at most (default 128). */
  maxNewTokens?: number;
  /** Strings that end generation; the stop string itself is not emitted. */
  stop?: string[];
  /** Aborts generation between tokens. */
  signal?: AbortSignal;
  /** Keep going past the end-of-sequence token (default false). */
  ignoreEos?: boolean;
  /** Continue this session instead of starting a new one (the prompt is appended). */
  session?: Session;
  /**
   * Run the decode steps through this batcher, together with those of the
   * other generations that use it (a server's concurrent streams).
   */
  batcher?: StepBatcher;
}

/**
 * One generated token. When generation ends at the end-of-sequence id while
 * text is still held back (the possible start of a stop string, or a split
 * character), one last event carries that text with the end-of-sequence id.
 */
export interface GenerationEvent {
  /** The sampled id. */
  token: number;
  /** Text completed by this token: complete UTF-8, possibly "" while a character is split. */
  text: string;
}

/** Why generation ended. */
export type FinishReason = "length" | "eos" | "stop" | "abort";

/** Counts and timings of a generation, filled in as it runs. */
export interface GenerationStats {
  /** Ids in the prompt. */
  promptTokens: number;
  /** Ids generated so far. */
  generatedTokens: number;
  /** Milliseconds spent on the prompt (prefill). */
  prefillMs: number;
  /** Milliseconds spent generating after the prefill. */
  decodeMs: number;
  /** Why it ended, once it has. */
  finishReason?: FinishReason;
}

/** What {@link generate} needs of a loaded model. */
export interface Generator {
  readonly tokenizer: MambaTokenizer;
  readonly vocabSize: number;
  readonly eosTokenId: number | undefined;
  session(): Session;
}

/** An async iterable of {@link GenerationEvent}s with live {@link GenerationStats}. */
export class Generation implements AsyncIterable<GenerationEvent> {
  /** Counts and timings, complete once iteration has finished. */
  readonly stats: GenerationStats = {
    promptTokens: 0,
    generatedTokens: 0,
    prefillMs: 0,
    decodeMs: 0,
  };
  /** The session generation ran in; snapshot it to continue later. */
  readonly session: Session;
  readonly #run: (stats: GenerationStats) => AsyncGenerator<GenerationEvent>;

  /** Wraps a generator function; see {@link generate}. */
  constructor(session: Session, run: (stats: GenerationStats) => AsyncGenerator<GenerationEvent>) {
    this.session = session;
    this.#run = run;
  }

  /** Starts generating; a generation can be iterated once. */
  [Symbol.asyncIterator](): AsyncIterator<GenerationEvent> {
    return this.#run(this.stats);
  }
}

/** Generates from `prompt` (text, or ids) on `model`. */
export function generate(
  model: Generator,
  prompt: string | readonly number[],
  options: GenerateOptions = {},
): Generation {
  const maxNewTokens = options.maxNewTokens ?? DEFAULT_MAX_NEW_TOKENS;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) {
    throw new RangeError(`maxNewTokens must be a non-negative integer, got ${maxNewTokens}`);
  }
  const stops = (options.stop ?? []).filter((s) => s.length > 0);
  const sampler = new Sampler(options);
  const promptIds = typeof prompt === "string" ? model.tokenizer.encode(prompt) : [...prompt];
  const session = options.session ?? model.session();
  // Rows past the tokenizer's vocabulary (embedding padding) are never sampled.
  const limit = Math.min(model.tokenizer.vocabSize, model.vocabSize);
  // Decoding stays on the device where the backend allows it: greedy, or
  // top-k sampling (see samplesTopK), with a penalty that fits the device.
  const { temperature, repetitionPenalty, repeatLastN } = sampler.options;
  const greedyOnDevice = temperature === 0 && session.greedyOnDevice(sampler.options);
  const sampledOnDevice = session.samplesOnDevice && samplesTopK(sampler.options, limit);
  const onDevice = !options.batcher && stops.length === 0 && (greedyOnDevice || sampledOnDevice);

  async function* run(stats: GenerationStats): AsyncGenerator<GenerationEvent> {
    stats.promptTokens = promptIds.length;
    const decoder = new StreamingDecoder(model.tokenizer, [...session.tokens, ...promptIds]);
    const started = performance.now();
    let logits = promptIds.length > 0 ? await session.prefill(promptIds) : session.lastLogits;
    if (!logits) throw new RangeError("Cannot generate from an empty prompt in a new session");
    stats.prefillMs = performance.now() - started;
    const decodeStart = performance.now();
    // Text decoded but not yet emitted because it may be the start of a stop string.
    let held = "";
    const finish = (reason: FinishReason) => {
      stats.finishReason = reason;
      stats.decodeMs = performance.now() - decodeStart;
    };
    if (onDevice) {
      // Decoding on the device: one call, read back in chunks that start
      // small (the first tokens arrive soon) and grow to 32; the device runs
      // on while each chunk is read.
      const aborted = () => options.signal?.aborted ?? false;
      // Set when the consumer stops iterating: the session then stops at the next chunk.
      let abandoned = false;
      const stopBefore = (id: number) =>
        abandoned || aborted() || (id === model.eosTokenId && !options.ignoreEos);
      const decode = { limit, stopBefore, chunks: growingChunks(maxNewTokens) };
      const chunks = arrivals<number[], { stopped: boolean }>((onIds) =>
        temperature === 0
          ? session.greedy(maxNewTokens, { ...decode, onIds, repetitionPenalty, repeatLastN })
          : session.sample(maxNewTokens, sampler, { ...decode, onIds })
      );
      let generated = 0;
      let next = await chunks.next();
      try {
        for (; !next.done; next = await chunks.next()) {
          for (const token of next.value) {
            generated++;
            stats.generatedTokens++;
            const text = decoder.push(token) + (generated === maxNewTokens ? decoder.flush() : "");
            yield { token, text };
          }
        }
      } finally {
        abandoned = true;
      }
      if (aborted() && generated < maxNewTokens) return finish("abort");
      if (next.value.stopped) {
        const rest = decoder.flush();
        if (rest) yield { token: model.eosTokenId!, text: rest };
        return finish("eos");
      }
      return finish("length");
    }
    const batcher = options.batcher;
    const step = (token: number) => batcher ? batcher.step(session, token) : session.step(token);
    const leave = batcher?.join();
    try {
      for (let i = 0; i < maxNewTokens; i++) {
        if (options.signal?.aborted) return finish("abort");
        const token = sampler.sample(logits, session.tokens, limit);
        if (token === model.eosTokenId && !options.ignoreEos) {
          const rest = held + decoder.flush();
          if (rest) yield { token, text: rest };
          return finish("eos");
        }
        stats.generatedTokens++;
        // Stepping the last token too keeps the session ready to be continued.
        logits = await step(token);
        held += decoder.push(token);
        const isLast = i === maxNewTokens - 1;
        if (isLast) held += decoder.flush();
        const stopAt = firstStop(held, stops);
        if (stopAt >= 0) {
          yield { token, text: held.slice(0, stopAt) };
          return finish("stop");
        }
        const keep = isLast ? 0 : heldBackLength(held, stops);
        const text = held.slice(0, held.length - keep);
        held = held.slice(held.length - keep);
        yield { token, text };
      }
      finish("length");
    } finally {
      // Also when the consumer stops iterating: the batcher must not wait for it.
      leave?.();
    }
  }
  return new Generation(session, run);
}

/** Read-back chunks of a device decode of `count` ids: 4, 8, 16, then 32 at a time. */
function growingChunks(count: number): number[] {
  const chunks: number[] = [];
  for (let size = 4, left = count; left > 0; size = Math.min(2 * size, 32)) {
    chunks.push(Math.min(size, left));
    left -= chunks[chunks.length - 1];
  }
  return chunks;
}

/**
 * The items that `start` hands to its callback, as an async generator whose
 * return value is what `start`'s promise resolves to (or which throws what
 * it rejects with).
 */
async function* arrivals<T, R>(
  start: (push: (item: T) => void) => Promise<R>,
): AsyncGenerator<T, R, undefined> {
  const waiting: T[] = [];
  let wake = () => {};
  let settled = false;
  const done = start((item) => {
    waiting.push(item);
    wake();
  }).finally(() => {
    settled = true;
    wake();
  });
  done.catch(() => {}); // Rethrown below.
  while (true) {
    while (waiting.length > 0) yield waiting.shift()!;
    if (settled) return await done;
    await new Promise<void>((resolve) => wake = resolve);
  }
}

function firstStop(text: string, stops: string[]): number {
  let first = -1;
  for (const stop of stops) {
    const at = text.indexOf(stop);
    if (at >= 0 && (first < 0 || at < first)) first = at;
  }
  return first;
}

/** Length of the longest suffix of `text` that is a proper prefix of a stop string. */
function heldBackLength(text: string, stops: string[]): number {
  let keep = 0;
  for (const stop of stops) {
    for (let n = Math.min(stop.length - 1, text.length); n > keep; n--) {
      if (text.endsWith(stop.slice(0, n))) {
        keep = n;
        break;
      }
    }
  }
  return keep;
}
