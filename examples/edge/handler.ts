/**
 * The edge server's request handler, independent of how it is served:
 * {@link createHandler} takes a loaded model and returns a
 * `(Request) => Promise<Response>` for `Deno.serve` (or a test).
 *
 * Endpoints:
 *
 * - `POST /v1/generate`: `{prompt, max_new_tokens, temperature, top_k, top_p,
 *   min_p, repetition_penalty, seed, stop, ignore_eos, stream, session}`. Streams
 *   Server-Sent Events (`data: {"token","text"}` per token, then
 *   `event: done` with counts and timings), or with `stream: false` replies
 *   with one JSON body.
 * - `POST /v1/completions`: OpenAI's completions shape (`max_tokens`,
 *   `choices`, `usage`, `data: [DONE]`), same engine.
 * - `GET /v1/stats`: generations running, counters, prefix-cache hits.
 * - `DELETE /v1/sessions/<id>`: forgets a session.
 *
 * Sessions: `session: "new"` starts one; the reply names its id (the
 * `X-Session-Id` header, and `session` in the final event or body). A later
 * request with that id continues from the saved state, prefilling only its
 * own prompt (which may be ""). The state is saved when a reply completes;
 * an aborted or failed reply leaves the session as it was (a new one is then
 * never created). An id the server does not know (never issued, deleted, or
 * evicted) is a 404. A session continues one request at a time: one already
 * generating, in this process or in another one sharing the session store
 * (Deno KV), is a 409 before anything is generated; see
 * docs/edge-scale-out.md. A reply whose session was taken over meanwhile
 * (its process stalled past the store's lease) ends with a 409-style error
 * (the status of a whole-body reply, an error event in a stream) and is not
 * saved.
 *
 * Every other failure of the request is a 4xx with `{error}`: bad JSON or
 * field types (400), limits (400 for prompt length and max_new_tokens, 413
 * for the body), wrong path (404) or method (405), and the concurrency cap
 * (429).
 *
 * @module
 */

import type { GenerationEvent, Mamba, Session } from "../../mod.ts";
import { PrefixCache, type PrefixCacheStats } from "./prefix_cache.ts";
import {
  type GenerationRequest,
  HttpError,
  isSessionId,
  parseCompletionsBody,
  parseGenerateBody,
  type RequestLimits,
} from "./request.ts";
import {
  MemorySessionStore,
  SessionBusyError,
  SessionConflictError,
  type SessionSave,
  type SessionStore,
  type SessionStoreStats,
  type SessionTurn,
} from "./store.ts";

/** Options of {@link createHandler}. */
export interface HandlerOptions {
  /** The model's name in replies, and its part of the prefix-cache key (default "mamba"). */
  modelName?: string;
  /** Where sessions are kept (default: a {@link MemorySessionStore}). */
  sessions?: SessionStore;
  /** Bytes of prefix-cache snapshots kept at most; 0 disables it (default 64 MiB). */
  prefixCacheBytes?: number;
  /** Generations running at once at most; beyond it requests get 429 (default 8). */
  maxConcurrent?: number;
  /**
   * Generations one API key (one tenant) runs at once at most; beyond it its
   * requests get 429 while other keys still get slots (default: `maxConcurrent`,
   * no cap of its own).
   */
  maxConcurrentPerKey?: number;
  /** Prompt tokens accepted at most (default 4096). */
  maxPromptTokens?: number;
  /** Largest `max_new_tokens` accepted (default 1024). */
  maxNewTokens?: number;
  /** `max_new_tokens` of a request that leaves it out (default 128). */
  defaultMaxNewTokens?: number;
  /** Request body bytes accepted at most (default 1 MiB). */
  maxBodyBytes?: number;
  /**
   * Prompt bytes (UTF-8) accepted at most, checked before tokenizing
   * (default 16 per token of `maxPromptTokens`).
   */
  maxPromptBytes?: number;
  /**
   * API keys accepted as `Authorization: Bearer <key>`; when given, every
   * request needs one (401 without). Each key is a tenant: its prefix cache
   * and session ids are its own. Empty or absent: no authentication, one
   * tenant.
   */
  apiKeys?: readonly string[];
}

/** What `GET /v1/stats` reports. */
export interface ServerStats {
  /** Generations running now. */
  active: number;
  /** The cap on `active`. */
  maxConcurrent: number;
  /** Generations that ran to their end. */
  completed: number;
  /** Generations stopped because the client went away. */
  aborted: number;
  /** Generations that failed with an error after their reply had started. */
  failed: number;
  /** Requests refused with 429. */
  rejected: number;
  /** Prefix-cache counters. */
  prefixCache: PrefixCacheStats;
  /** The session store's counters, where it reports any. */
  sessions: SessionStoreStats | null;
}

/** Counts and timings of one generation, as the final event reports them. */
interface Summary {
  finishReason: string;
  promptTokens: number;
  cachedTokens: number;
  generatedTokens: number;
  prefillMs: number;
  decodeMs: number;
  firstTokenMs: number | null;
  session: string | null;
}

/** A checked request with its prompt ids and the session it will run in. */
interface Job {
  request: GenerationRequest;
  ids: number[];
  /** Restored from the session store, from a cached prefix, or new. */
  session: Session;
  /**
   * The turn that saves the session when the reply completes: the stored
   * session's, or a new session's first (its id reserved); null without a session.
   */
  save: SessionSave | null;
  /** Leading prompt ids already in `session` from the prefix cache. */
  cachedTokens: number;
  /** The session id the client sees, or null. */
  sessionId: string | null;
  /** The prefix cache's namespace: the tenant's and the model's. */
  cacheScope: string;
  /** When the request arrived (performance.now()). */
  started: number;
  /** Frees the slot, the session's turn and its state; safe to call twice. */
  release: () => Promise<void>;
}

/** How an endpoint writes tokens, the end and errors, streamed or as one body. */
interface Format {
  event(event: GenerationEvent): string;
  done(summary: Summary): string;
  error(message: string): string;
  body(text: string, tokens: number[], summary: Summary): unknown;
}

/** A failure of a reply that has started: its message, and the status a whole-body reply gets. */
interface Failure {
  status: number;
  message: string;
}

const JSON_HEADERS = { "content-type": "application/json; charset=utf-8" };

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { ...JSON_HEADERS, ...headers } });
}

function sse(data: unknown, event?: string): string {
  return `${event ? `event: ${event}\n` : ""}data: ${JSON.stringify(data)}\n\n`;
}

/** The client closed the connection before its request body arrived. */
class ClientGoneError extends Error {
  constructor() {
    super("The client closed the connection during the request body");
  }
}

/** Reads a JSON body of at most `maxBytes` bytes, whatever Content-Length claims. */
async function readJsonBody(request: Request, maxBytes: number): Promise<unknown> {
  const tooLarge = () => new HttpError(413, `The request body is over ${maxBytes} bytes`);
  if (Number(request.headers.get("content-length")) > maxBytes) throw tooLarge();
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (request.body) {
    try {
      for await (const chunk of request.body) {
        size += chunk.byteLength;
        if (size > maxBytes) throw tooLarge(); // Leaving the loop cancels the body.
        chunks.push(chunk);
      }
    } catch (error) {
      if (error instanceof HttpError) throw error;
      // The client went away during the upload: a normal disconnect.
      throw new ClientGoneError();
    }
  }
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new HttpError(400, `The request body is not valid JSON: ${(error as Error).message}`);
  }
}

/** A session's key in the store: the tenant's name (none without API keys) and the client's id. */
function storeId(tenant: string, id: string): string {
  return tenant === "" ? id : `${tenant}/${id}`;
}

/** Compares two byte strings in time that depends on their lengths only, not on where they differ. */
function constantTimeEquals(a: Uint8Array, b: Uint8Array): boolean {
  let difference = a.length ^ b.length;
  for (let i = 0; i < a.length; i++) difference |= a[i] ^ b[i % b.length];
  return difference === 0 && b.length > 0;
}

/** The tenant name of an API key: a digest, so that keys appear in no store key or log. */
async function tenantOf(key: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", key));
  return Array.from(digest.subarray(0, 12), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/** The final event of `/v1/generate`, and the counts of its JSON body. */
function summaryJson(summary: Summary) {
  const decodeSeconds = summary.decodeMs / 1000;
  return {
    finish_reason: summary.finishReason,
    prompt_tokens: summary.promptTokens,
    cached_tokens: summary.cachedTokens,
    generated_tokens: summary.generatedTokens,
    prefill_ms: round(summary.prefillMs),
    decode_ms: round(summary.decodeMs),
    first_token_ms: summary.firstTokenMs === null ? null : round(summary.firstTokenMs),
    tokens_per_second: decodeSeconds > 0 ? round(summary.generatedTokens / decodeSeconds) : null,
    session: summary.session,
  };
}

const GENERATE_FORMAT: Format = {
  event: ({ token, text }) => sse({ token, text }),
  done: (summary) => sse(summaryJson(summary), "done"),
  error: (message) => sse({ error: message }, "error"),
  body: (text, tokens, summary) => ({ text, tokens, ...summaryJson(summary) }),
};

/** OpenAI's completions objects: `choices`, `usage`, `finish_reason` "stop" or "length". */
function completionsFormat(modelName: string): Format {
  const id = `cmpl-${crypto.randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const chunk = (text: string, finishReason: string | null) => ({
    id,
    object: "text_completion",
    created,
    model: modelName,
    choices: [{ text, index: 0, logprobs: null, finish_reason: finishReason }],
  });
  const finishReason = (summary: Summary) => summary.finishReason === "length" ? "length" : "stop";
  const usage = (summary: Summary) => ({
    prompt_tokens: summary.promptTokens,
    completion_tokens: summary.generatedTokens,
    total_tokens: summary.promptTokens + summary.generatedTokens,
  });
  return {
    event: ({ text }) => sse(chunk(text, null)),
    done: (summary) =>
      sse({
        ...chunk("", finishReason(summary)),
        usage: usage(summary),
        session: summary.session,
      }) + "data: [DONE]\n\n",
    error: (message) => sse({ error: { message } }),
    body: (text, _tokens, summary) => ({
      ...chunk(text, finishReason(summary)),
      usage: usage(summary),
      session: summary.session,
    }),
  };
}

/**
 * A request handler serving `model`; see the module documentation for the
 * endpoints. State is per handler: its own concurrency count, prefix cache
 * and (unless one is passed) session store.
 */
export function createHandler(
  model: Mamba,
  options: HandlerOptions = {},
): (request: Request) => Promise<Response> {
  const modelName = options.modelName ?? "mamba";
  const sessions = options.sessions ?? new MemorySessionStore();
  const prefixCache = new PrefixCache(options.prefixCacheBytes ?? 64 << 20);
  const maxConcurrent = options.maxConcurrent ?? 8;
  const maxConcurrentPerKey = options.maxConcurrentPerKey ?? maxConcurrent;
  /** Generations running per tenant; a tenant leaves the map when it has none. */
  const activeByTenant = new Map<string, number>();
  const maxPromptTokens = options.maxPromptTokens ?? 4096;
  const maxBodyBytes = options.maxBodyBytes ?? 1 << 20;
  const maxPromptBytes = options.maxPromptBytes ?? maxPromptTokens * 16;
  const encoder = new TextEncoder();
  const apiKeys = (options.apiKeys ?? []).filter((key) => key !== "");
  const tenants = Promise.all(
    apiKeys.map(async (key) => {
      const bytes = encoder.encode(key);
      return { bytes, tenant: await tenantOf(bytes) };
    }),
  );
  const limits: RequestLimits = {
    maxNewTokens: options.maxNewTokens ?? 1024,
    defaultMaxNewTokens: Math.min(options.defaultMaxNewTokens ?? 128, options.maxNewTokens ?? 1024),
  };
  const counters = { active: 0, completed: 0, aborted: 0, failed: 0, rejected: 0 };

  function stats(): ServerStats {
    return {
      ...counters,
      maxConcurrent,
      prefixCache: prefixCache.stats(),
      sessions: sessions.stats?.() ?? null,
    };
  }

  /**
   * Takes a concurrency slot, tokenizes, and restores the session (stored, or
   * the longest cached prefix); throws HttpError to refuse the request.
   */
  async function prepare(
    request: GenerationRequest,
    tenant: string,
    started: number,
  ): Promise<Job> {
    const promptBytes = encoder.encode(request.prompt).length;
    if (promptBytes > maxPromptBytes) {
      throw new HttpError(
        400,
        `The prompt has ${promptBytes} bytes; the limit is ${maxPromptBytes}`,
      );
    }
    // Sessions and cached prefixes of one tenant are invisible to the others.
    const cacheScope = `${tenant}\u0000${modelName}`;
    if (counters.active >= maxConcurrent) {
      counters.rejected++;
      throw new HttpError(
        429,
        `Too many generations running (the limit is ${maxConcurrent}); retry later`,
        { "retry-after": "1" },
      );
    }
    const tenantActive = activeByTenant.get(tenant) ?? 0;
    if (tenantActive >= maxConcurrentPerKey) {
      counters.rejected++;
      throw new HttpError(
        429,
        `Too many generations running for this API key (the limit per key is ${maxConcurrentPerKey}); retry later`,
        { "retry-after": "1" },
      );
    }
    // Taken synchronously after the checks, so concurrent requests cannot both pass them.
    counters.active++;
    activeByTenant.set(tenant, tenantActive + 1);
    let turn: SessionSave | null = null;
    let restored: Session | null = null;
    let released = false;
    const release = async () => {
      if (released) return;
      released = true;
      counters.active--;
      const left = activeByTenant.get(tenant)! - 1;
      if (left === 0) activeByTenant.delete(tenant);
      else activeByTenant.set(tenant, left);
      restored?.dispose();
      await turn?.release();
    };
    try {
      let ids: number[];
      try {
        // In slices that yield, so a long prompt never stalls other clients' streams.
        ids = await model.tokenizer.encodeInSlices(request.prompt);
      } catch (error) {
        throw new HttpError(400, `Cannot tokenize the prompt: ${(error as Error).message}`);
      }
      if (ids.length > maxPromptTokens) {
        throw new HttpError(
          400,
          `The prompt has ${ids.length} tokens; the limit is ${maxPromptTokens}`,
        );
      }
      const { session } = request;
      if (session.kind !== "continue" && ids.length === 0) {
        throw new HttpError(400, "Field prompt must not be empty unless continuing a session");
      }
      if (session.kind === "continue") {
        let stored: SessionTurn | null;
        try {
          // The session's latest state, and the exclusive right to save the next one.
          stored = await sessions.begin(storeId(tenant, session.id));
        } catch (error) {
          if (error instanceof SessionBusyError) throw new HttpError(409, error.message);
          throw error;
        }
        if (stored === null) throw new HttpError(404, `Unknown session ${session.id}`);
        turn = stored;
        try {
          restored = model.session(stored.snapshot);
        } catch (error) {
          // Saved by another model, e.g. before a redeploy with a different one.
          throw new HttpError(
            409,
            `Session ${session.id} cannot continue on this model: ${(error as Error).message}`,
          );
        }
        return {
          request,
          ids,
          session: restored,
          save: turn,
          cacheScope,
          cachedTokens: 0,
          sessionId: session.id,
          started,
          release,
        };
      }
      const sessionId = session.kind === "new" ? crypto.randomUUID() : null;
      // The new id is taken before the client learns it, so that a continue or
      // a delete of it during this first reply is refused as during later ones.
      if (sessionId !== null) turn = await sessions.create(storeId(tenant, sessionId));
      const hit = prefixCache.lookup(cacheScope, ids);
      restored = model.session(hit?.snapshot);
      return {
        request,
        ids,
        session: restored,
        save: turn,
        cachedTokens: hit?.ids.length ?? 0,
        sessionId,
        cacheScope,
        started,
        release,
      };
    } catch (error) {
      await release();
      throw error;
    }
  }

  /**
   * Prefills what the session lacks of the prompt, generates, and saves the
   * session; yields each token and returns the summary.
   */
  async function* execute(job: Job, signal: AbortSignal): AsyncGenerator<GenerationEvent, Summary> {
    const { request, ids, session } = job;
    const prefillStart = performance.now();
    let prompt = ids.slice(job.cachedTokens);
    // A continued session's state is its own; the prefix cache serves the others.
    const continued = request.session.kind === "continue";
    if (prompt.length > 0 && !continued && prefixCache.enabled) {
      // The prefix cache keeps the state after the prompt: feed it alone and
      // snapshot it. Otherwise the prompt goes to the decode engine with the
      // generation, which reads nothing back before the first ids.
      await session.prefill(prompt);
      prefixCache.store(job.cacheScope, ids, await session.snapshot());
      prompt = [];
    }
    const cachingMs = performance.now() - prefillStart;
    const generation = model.generate(prompt, {
      ...request.sampling,
      maxNewTokens: request.maxNewTokens,
      stop: request.stop,
      ignoreEos: request.ignoreEos,
      signal,
      session,
    });
    let firstTokenMs: number | null = null;
    for await (const event of generation) {
      firstTokenMs ??= performance.now() - job.started;
      yield event;
    }
    const finishReason = generation.stats.finishReason ?? "length";
    // A turn saves only over the state it began from (none, for a new session).
    if (job.save !== null && finishReason !== "abort") {
      await job.save.commit(await session.snapshot());
    }
    return {
      finishReason,
      promptTokens: ids.length,
      cachedTokens: job.cachedTokens,
      generatedTokens: generation.stats.generatedTokens,
      prefillMs: cachingMs + generation.stats.prefillMs,
      decodeMs: generation.stats.decodeMs,
      firstTokenMs,
      session: job.sessionId,
    };
  }

  /**
   * Runs a job to its end, counting how it ended, and frees its slot. It
   * never throws: a failure is passed to `onError` and the result is null.
   */
  async function run(
    job: Job,
    signal: AbortSignal,
    onEvent: (event: GenerationEvent) => void,
    onError: (failure: Failure) => void,
  ): Promise<Summary | null> {
    try {
      const events = execute(job, signal);
      for (;;) {
        const next = await events.next();
        if (next.done) {
          counters[next.value.finishReason === "abort" ? "aborted" : "completed"]++;
          return next.value;
        }
        onEvent(next.value);
      }
    } catch (error) {
      counters.failed++;
      if (error instanceof SessionConflictError) {
        console.error(error.message);
        onError({ status: 409, message: error.message });
      } else {
        console.error("Generation failed:", error);
        onError({ status: 500, message: `Generation failed: ${(error as Error).message}` });
      }
      return null;
    } finally {
      await job.release().catch((error) => console.error("Releasing a session failed:", error));
    }
  }

  function respond(
    job: Job,
    format: Format,
    clientSignal: AbortSignal,
  ): Response | Promise<Response> {
    const headers: Record<string, string> = job.sessionId === null
      ? {}
      : { "x-session-id": job.sessionId };
    // Where Deno's legacy request.signal is in force (without --unstable-no-legacy-abort),
    // it also aborts once a reply is delivered, which is harmless here: by then the
    // generation is over.
    if (!job.request.stream) return collect(job, format, clientSignal, headers);
    const cancelled = new AbortController();
    const signal = AbortSignal.any([clientSignal, cancelled.signal]);
    const encoder = new TextEncoder();
    let open = true;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const send = (text: string) => {
          if (open) controller.enqueue(encoder.encode(text));
        };
        run(
          job,
          signal,
          (event) => send(format.event(event)),
          (failure) => send(format.error(failure.message)),
        )
          .then((summary) => {
            if (summary && summary.finishReason !== "abort") send(format.done(summary));
            if (open) controller.close();
            open = false;
          });
      },
      // The client went away: stop generating (at the next token) and free the slot.
      cancel() {
        open = false;
        cancelled.abort();
      },
    });
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        ...headers,
      },
    });
  }

  async function collect(
    job: Job,
    format: Format,
    signal: AbortSignal,
    headers: Record<string, string>,
  ): Promise<Response> {
    let text = "";
    const tokens: number[] = [];
    let failure: Failure = { status: 500, message: "" };
    const summary = await run(job, signal, (event) => {
      text += event.text;
      tokens.push(event.token);
    }, (error) => failure = error);
    if (summary === null) return json(failure.status, { error: failure.message }, headers);
    return json(200, format.body(text, tokens, summary), headers);
  }

  async function generate(
    request: Request,
    tenant: string,
    parse: (body: unknown, limits: RequestLimits) => GenerationRequest,
    format: Format,
  ): Promise<Response> {
    const started = performance.now();
    const body = parse(await readJsonBody(request, maxBodyBytes), limits);
    return respond(await prepare(body, tenant, started), format, request.signal);
  }

  /**
   * The tenant a request acts for: "" without API keys, else its key's
   * digest; a missing or unknown key is a 401. Every key is compared, so the
   * time taken says nothing about which one came close.
   */
  async function authenticate(request: Request): Promise<string> {
    const known = await tenants;
    if (known.length === 0) return "";
    const match = /^Bearer +(\S+) *$/i.exec(request.headers.get("authorization") ?? "");
    const given = encoder.encode(match?.[1] ?? "");
    let tenant: string | null = null;
    for (const key of known) {
      if (constantTimeEquals(given, key.bytes)) tenant = key.tenant;
    }
    if (tenant === null) {
      throw new HttpError(
        401,
        match
          ? "The API key is not valid"
          : "An API key is required: send the header Authorization: Bearer <key>",
        { "www-authenticate": "Bearer" },
      );
    }
    return tenant;
  }

  type Route = (request: Request, tenant: string) => Promise<Response>;
  const routes: Record<string, Record<string, Route>> = {
    "/v1/generate": {
      POST: (request, tenant) => generate(request, tenant, parseGenerateBody, GENERATE_FORMAT),
    },
    "/v1/completions": {
      POST: (request, tenant) =>
        generate(request, tenant, parseCompletionsBody, completionsFormat(modelName)),
    },
    "/v1/stats": { GET: () => Promise.resolve(json(200, stats())) },
  };

  async function deleteSession(tenant: string, encodedId: string): Promise<Response> {
    let id: string;
    try {
      id = decodeURIComponent(encodedId);
    } catch {
      throw new HttpError(400, `The session id ${encodedId} is not valid percent-encoded UTF-8`);
    }
    if (!isSessionId(id)) {
      throw new HttpError(
        400,
        "The session id in the path is not one this server issues (1 to 128 letters, digits, _ or -)",
      );
    }
    let deleted: boolean;
    try {
      deleted = await sessions.delete(storeId(tenant, id));
    } catch (error) {
      if (error instanceof SessionBusyError) {
        throw new HttpError(409, `Session ${id} is generating a reply; delete it afterwards`);
      }
      throw error;
    }
    if (!deleted) throw new HttpError(404, `Unknown session ${id}`);
    return new Response(null, { status: 204 });
  }

  return async (request: Request): Promise<Response> => {
    try {
      const { pathname } = new URL(request.url);
      const tenant = await authenticate(request);
      const session = /^\/v1\/sessions\/([^/]+)$/.exec(pathname);
      if (session) {
        if (request.method !== "DELETE") {
          throw new HttpError(405, `Use DELETE on ${pathname}`, { allow: "DELETE" });
        }
        return await deleteSession(tenant, session[1]);
      }
      // Own properties only: a path or method such as "constructor" is no route.
      const route = Object.hasOwn(routes, pathname) ? routes[pathname] : undefined;
      if (!route) throw new HttpError(404, `No endpoint at ${pathname}`);
      const handle = Object.hasOwn(route, request.method) ? route[request.method] : undefined;
      if (!handle) {
        const allowed = Object.keys(route).join(", ");
        throw new HttpError(405, `Use ${allowed} on ${pathname}`, { allow: allowed });
      }
      return await handle(request, tenant);
    } catch (error) {
      if (error instanceof HttpError) {
        return json(error.status, { error: error.message }, error.headers);
      }
      // Nobody reads this reply; the disconnect is no fault of the server.
      if (error instanceof ClientGoneError) return json(400, { error: error.message });
      console.error("Request failed:", error);
      return json(500, { error: `Internal error: ${(error as Error).message}` });
    }
  };
}
