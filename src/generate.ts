/**
 * Streaming text generation: the prompt and the decoding go to the model's
 * decode engine as one sequence (see `engine.ts`), whose ids come back a
 * round at a time; each id is turned into the text it completes, checked
 * against the stop strings, and yielded.
 *
 * @module
 */

import type { Verdict } from "./engine.ts";
import { Sampler, type SamplingOptions } from "./sampler.ts";
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
  /** Milliseconds until the first generated id was known: the prompt fed, the first id picked. */
  prefillMs: number;
  /** Milliseconds from then until the end. */
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

/**
 * Generates from `prompt` (text, or ids) on `model`. Generations that run at
 * the same time on one model decode together, a round of steps at a time.
 */
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
  // Its slot may serve others while it waits to run and once it is done (see Session.park).
  if (!options.session) session.park();
  // Rows past the tokenizer's vocabulary (embedding padding) are never sampled.
  const limit = Math.min(model.tokenizer.vocabSize, model.vocabSize);

  async function* run(stats: GenerationStats): AsyncGenerator<GenerationEvent> {
    stats.promptTokens = promptIds.length;
    if (promptIds.length === 0 && session.tokens.length === 0) {
      throw new RangeError("Cannot generate from an empty prompt in a new session");
    }
    const decoder = new StreamingDecoder(model.tokenizer, [...session.tokens, ...promptIds]);
    const started = performance.now();
    let firstAt = 0;
    const events: GenerationEvent[] = [];
    let wake = () => {};
    let reason: FinishReason = "length";
    // Set when the consumer stops iterating: the engine then ends the sequence.
    let abandoned = false;
    // Text decoded but not yet emitted because it may be the start of a stop string.
    let held = "";
    let generated = 0;
    const emit = (event: GenerationEvent) => {
      events.push(event);
      wake();
    };
    const judge = (id: number): Verdict => {
      if (generated === 0) firstAt = performance.now();
      if (abandoned || options.signal?.aborted) {
        reason = "abort";
        return "stop-before";
      }
      if (id === model.eosTokenId && !options.ignoreEos) {
        reason = "eos";
        const rest = held + decoder.flush();
        if (rest) emit({ token: id, text: rest });
        return "stop-before";
      }
      generated++;
      stats.generatedTokens++;
      held += decoder.push(id);
      const isLast = generated === maxNewTokens;
      if (isLast) held += decoder.flush();
      const stopAt = firstStop(held, stops);
      if (stopAt >= 0) {
        reason = "stop";
        emit({ token: id, text: held.slice(0, stopAt) });
        return "stop-after";
      }
      const keep = isLast ? 0 : heldBackLength(held, stops);
      emit({ token: id, text: held.slice(0, held.length - keep) });
      held = held.slice(held.length - keep);
      return "continue";
    };
    let settled = false;
    const done = session.decode({
      prompt: promptIds,
      sampler,
      maxTokens: maxNewTokens,
      limit,
      judge,
    })
      .finally(() => {
        settled = true;
        wake();
      });
    done.catch(() => {}); // Rethrown below.
    try {
      while (true) {
        while (events.length > 0) yield events.shift()!;
        if (settled) break;
        await new Promise<void>((resolve) => wake = resolve);
      }
      await done;
    } finally {
      // Also when the consumer stops iterating: the sequence ends at its next round.
      abandoned = true;
    }
    const end = performance.now();
    stats.prefillMs = (firstAt || end) - started;
    stats.decodeMs = end - (firstAt || end);
    stats.finishReason = reason;
  }
  return new Generation(session, run);
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
