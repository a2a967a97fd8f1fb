/**
 * Request bodies of the edge server, checked field by field into one
 * {@link GenerationRequest}. Every problem is an {@link HttpError} whose
 * message names the JSON field, so a client sees what to fix.
 *
 * @module
 */

import type { SamplingOptions } from "../../mod.ts";

/** A failure to report to the client as `{error}` with this HTTP status. */
export class HttpError extends Error {
  /** The HTTP status code of the reply. */
  readonly status: number;
  /** Extra reply headers (e.g. `Allow`, `Retry-After`). */
  readonly headers: Record<string, string>;

  /** An error with the status and message the client gets. */
  constructor(status: number, message: string, headers: Record<string, string> = {}) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.headers = headers;
  }
}

/** What a request asks of its session. */
export type SessionRequest =
  | { kind: "none" }
  | { kind: "new" }
  | { kind: "continue"; id: string };

/** A checked generation request, whichever endpoint it came through. */
export interface GenerationRequest {
  /** Text to prefill; "" only when continuing a session. */
  prompt: string;
  /** Tokens to generate at most. */
  maxNewTokens: number;
  /** Sampling options for the library. */
  sampling: SamplingOptions;
  /** Strings that end generation. */
  stop: string[];
  /** Keep generating past the end-of-sequence token (for benchmarks). */
  ignoreEos: boolean;
  /** Stream Server-Sent Events (true) or reply with one JSON body. */
  stream: boolean;
  /** Whether and which session the request continues. */
  session: SessionRequest;
}

/** Limits applied while checking a request. */
export interface RequestLimits {
  /** Largest `max_new_tokens` accepted. */
  maxNewTokens: number;
  /** `max_new_tokens` when the request leaves it out. */
  defaultMaxNewTokens: number;
}

/** Server-issued session ids are UUIDs; this also bounds what reaches a store's keys. */
const SESSION_ID = /^[A-Za-z0-9_-]{1,128}$/;

/** What a session id may be: letters, digits, `_` and `-`, 1 to 128 of them. */
export function isSessionId(value: string): boolean {
  return SESSION_ID.test(value);
}

type Json = Record<string, unknown>;

/** Characters of a client's value that an error message repeats, at most. */
const SHOWN_CHARS = 80;

/** `value` as JSON for an error message, cut to SHOWN_CHARS (a body may be a megabyte). */
function shown(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= SHOWN_CHARS ? text : `${text.slice(0, SHOWN_CHARS)}… (cut)`;
}

/** Typed, range-checked access to the fields of a JSON object body. */
class Fields {
  constructor(readonly body: Json) {}

  #get(name: string): unknown {
    const value = this.body[name];
    return value === null ? undefined : value;
  }

  number(name: string, rule: string, ok: (n: number) => boolean): number | undefined {
    const value = this.#get(name);
    if (value === undefined) return undefined;
    if (typeof value !== "number" || !ok(value)) {
      throw new HttpError(400, `Field ${name} must be ${rule}, got ${shown(value)}`);
    }
    return value;
  }

  integer(name: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
    const rule = max === Number.MAX_SAFE_INTEGER
      ? `an integer of ${min} or more`
      : `an integer from ${min} to ${max}`;
    return this.number(name, rule, (n) => Number.isSafeInteger(n) && n >= min && n <= max);
  }

  string(name: string): string | undefined {
    const value = this.#get(name);
    if (value === undefined || typeof value === "string") return value;
    throw new HttpError(400, `Field ${name} must be a string, got ${shown(value)}`);
  }

  boolean(name: string): boolean | undefined {
    const value = this.#get(name);
    if (value === undefined || typeof value === "boolean") return value;
    throw new HttpError(400, `Field ${name} must be true or false, got ${shown(value)}`);
  }

  /** A string or an array of strings (OpenAI's `stop`). */
  strings(name: string): string[] {
    const value = this.#get(name);
    if (value === undefined) return [];
    if (typeof value === "string") return [value];
    if (Array.isArray(value) && value.every((s) => typeof s === "string")) return value;
    throw new HttpError(400, `Field ${name} must be a string or an array of strings`);
  }

  sampling(defaults: SamplingOptions): SamplingOptions {
    const finite = (n: number) => Number.isFinite(n);
    return {
      ...defaults,
      ...defined({
        temperature: this.number(
          "temperature",
          "a finite number of 0 or more (0 is greedy)",
          (n) => finite(n) && n >= 0,
        ),
        topK: this.integer("top_k", 0),
        topP: this.number("top_p", "more than 0 and at most 1", (n) => n > 0 && n <= 1),
        minP: this.number("min_p", "between 0 and 1", (n) => n >= 0 && n <= 1),
        repetitionPenalty: this.number(
          "repetition_penalty",
          "a finite number above 0",
          (n) => finite(n) && n > 0,
        ),
        seed: this.integer("seed", 0),
      }),
    };
  }
}

/** The object without its undefined values, so that spreading it keeps defaults. */
function defined<T extends object>(object: T): Partial<T> {
  return Object.fromEntries(
    Object.entries(object).filter(([, value]) => value !== undefined),
  ) as Partial<T>;
}

function objectBody(body: unknown): Json {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "The request body must be a JSON object");
  }
  return body as Json;
}

function sessionRequest(value: string | undefined): SessionRequest {
  if (value === undefined) return { kind: "none" };
  if (value === "new") return { kind: "new" };
  if (!isSessionId(value)) {
    throw new HttpError(400, `Field session must be "new" or a session id, got ${shown(value)}`);
  }
  return { kind: "continue", id: value };
}

const GENERATE_FIELDS = new Set([
  "prompt",
  "max_new_tokens",
  "temperature",
  "top_k",
  "top_p",
  "min_p",
  "repetition_penalty",
  "seed",
  "stop",
  "ignore_eos",
  "stream",
  "session",
]);

/**
 * Checks a `POST /v1/generate` body. Unknown fields are refused, so that a
 * misspelt option is not silently ignored. Sampling defaults are the
 * library's (llama.cpp's); `stream` defaults to true.
 */
export function parseGenerateBody(body: unknown, limits: RequestLimits): GenerationRequest {
  const fields = new Fields(objectBody(body));
  const unknown = Object.keys(fields.body).filter((key) => !GENERATE_FIELDS.has(key));
  if (unknown.length > 0) {
    throw new HttpError(
      400,
      `Unknown field ${shown(unknown[0])}; known fields: ${[...GENERATE_FIELDS].join(", ")}`,
    );
  }
  const prompt = fields.string("prompt");
  if (prompt === undefined) throw new HttpError(400, "Field prompt is required");
  return {
    prompt,
    maxNewTokens: fields.integer("max_new_tokens", 0, limits.maxNewTokens) ??
      limits.defaultMaxNewTokens,
    sampling: fields.sampling({}),
    stop: fields.strings("stop"),
    ignoreEos: fields.boolean("ignore_eos") ?? false,
    stream: fields.boolean("stream") ?? true,
    session: sessionRequest(fields.string("session")),
  };
}

/**
 * Checks a `POST /v1/completions` body (OpenAI's legacy completions shape).
 * OpenAI's defaults apply: `max_tokens` 16, `temperature` 1, no top-k or
 * min-p, `stream` false. Fields this server has no use for (`model`, `user`,
 * penalties) are ignored; `n` and `best_of` above 1, `echo` and `logprobs`
 * are refused. `session` is accepted as an extension.
 */
export function parseCompletionsBody(body: unknown, limits: RequestLimits): GenerationRequest {
  const fields = new Fields(objectBody(body));
  const prompt = fields.string("prompt");
  if (prompt === undefined) throw new HttpError(400, "Field prompt is required (one string)");
  fields.integer("n", 1, 1);
  fields.integer("best_of", 1, 1);
  if (fields.boolean("echo")) throw new HttpError(400, "Field echo is not supported");
  if (fields.body.logprobs != null) throw new HttpError(400, "Field logprobs is not supported");
  return {
    prompt,
    maxNewTokens: fields.integer("max_tokens", 0, limits.maxNewTokens) ??
      Math.min(16, limits.maxNewTokens),
    sampling: fields.sampling({ temperature: 1, topK: 0, topP: 1, minP: 0 }),
    stop: fields.strings("stop"),
    ignoreEos: false,
    stream: fields.boolean("stream") ?? false,
    session: sessionRequest(fields.string("session")),
  };
}
