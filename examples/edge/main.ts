/**
 * The edge server's entry point: loads a model and serves it with
 * `Deno.serve` (`deno task serve`, or deploy this file). Configuration comes
 * from the environment:
 *
 * | variable                       | meaning                                              | default                          |
 * | ------------------------------ | ---------------------------------------------------- | -------------------------------- |
 * | `MAMBA_MODEL`                  | model directory: path, URL or HF repo id             | the bundled tiny-shakespeare     |
 * | `MAMBA_BACKEND`                | `auto`, `js`, `wasm` or `webgpu`                     | `auto` (the library's choice)    |
 * | `MAMBA_THREADS`                | threads of the wasm backend (1: no workers)          | all cores                        |
 * | `MAMBA_SESSION_STORE`          | `memory` or `kv` (Deno KV)                           | `kv` on Deno Deploy, else memory |
 * | `MAMBA_SESSION_MEMORY_MB`      | memory store size; least recently used go first      | 256                              |
 * | `MAMBA_KV_PATH`                | Deno KV database: file path or KV Connect URL        | Deno's default database          |
 * | `MAMBA_SESSION_TTL_SECONDS`    | KV sessions expire this long after their last save   | never                            |
 * | `MAMBA_SESSION_LEASE_SECONDS`  | lease of a KV session's turn (renewed while running) | 15                               |
 * | `MAMBA_KV_CACHE_MB`            | KV snapshots kept in this process, version-checked   | 64                               |
 * | `MAMBA_MAX_CONCURRENT`         | generations at once; more get 429                    | 8                                |
 * | `MAMBA_MAX_CONCURRENT_PER_KEY` | generations at once per API key; more get 429        | `MAMBA_MAX_CONCURRENT`           |
 * | `MAMBA_MAX_PROMPT_TOKENS`      | prompt tokens accepted                               | 4096                             |
 * | `MAMBA_MAX_NEW_TOKENS`         | largest `max_new_tokens`                             | 1024                             |
 * | `MAMBA_PREFIX_CACHE_MB`        | prefix-cache size (0: off)                           | 64                               |
 * | `MAMBA_API_KEYS`               | comma-separated keys, sent as `Bearer` tokens        | none (no authentication)         |
 * | `MAMBA_HOST`                   | address to listen on (`0.0.0.0`: every interface)    | 127.0.0.1                        |
 * | `PORT`                         | port to listen on                                    | 8000                             |
 *
 * Each API key is a tenant with its own sessions and prefix cache. Before
 * exposing the server beyond this machine, read docs/edge-server.md. A bad
 * setting or a port in use ends the process with one line on stderr and exit
 * code 1, before the model loads.
 *
 * Several processes (or Deno Deploy isolates) given one KV database serve
 * the same sessions, one turn at a time: see docs/edge-scale-out.md.
 *
 * @module
 */

import { type BackendName, loadModel } from "../../mod.ts";
import { createHandler, type HandlerOptions } from "./handler.ts";
import { KvSessionStore, MemorySessionStore, openKv, type SessionStore } from "./store.ts";

export { createHandler, type HandlerOptions, type ServerStats } from "./handler.ts";
export type { PrefixCacheStats } from "./prefix_cache.ts";
export {
  KvSessionStore,
  type KvSessionStoreOptions,
  MemorySessionStore,
  type MemorySessionStoreOptions,
  openKv,
  retryWhileBusy,
  SessionBusyError,
  SessionConflictError,
  type SessionSave,
  type SessionStore,
  type SessionStoreStats,
  type SessionTurn,
} from "./store.ts";

const BACKENDS: readonly BackendName[] = ["auto", "js", "wasm", "webgpu"];

/** An environment variable as an integer of at least `min`, or undefined when unset. */
function integerEnv(name: string, min = 1): number | undefined {
  const text = Deno.env.get(name);
  if (text === undefined || text === "") return undefined;
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < min) {
    throw new Error(`${name} must be an integer of ${min} or more, got ${JSON.stringify(text)}`);
  }
  return value;
}

async function openSessionStore(): Promise<SessionStore> {
  const onDeploy = Deno.env.get("DENO_DEPLOYMENT_ID") !== undefined;
  const kind = Deno.env.get("MAMBA_SESSION_STORE") || (onDeploy ? "kv" : "memory");
  if (kind === "memory") {
    const megabytes = integerEnv("MAMBA_SESSION_MEMORY_MB");
    return new MemorySessionStore({ maxBytes: megabytes && megabytes * (1 << 20) });
  }
  if (kind !== "kv") {
    throw new Error(`MAMBA_SESSION_STORE must be "memory" or "kv", got ${JSON.stringify(kind)}`);
  }
  const ttl = integerEnv("MAMBA_SESSION_TTL_SECONDS");
  const lease = integerEnv("MAMBA_SESSION_LEASE_SECONDS");
  const cacheMegabytes = integerEnv("MAMBA_KV_CACHE_MB", 0);
  const kv = await openKv(Deno.env.get("MAMBA_KV_PATH") || undefined);
  return new KvSessionStore(kv, {
    expireInMs: ttl === undefined ? undefined : ttl * 1000,
    leaseMs: lease === undefined ? undefined : lease * 1000,
    cacheBytes: cacheMegabytes === undefined ? undefined : cacheMegabytes * (1 << 20),
  });
}

/** The model's name in replies: its directory's or repository's last part, never a local path. */
export function modelNameOf(location: string | URL): string {
  const text = location instanceof URL ? location.pathname : location;
  const parts = text.split(/[\\/]/).filter((part) => part !== "");
  return parts.at(-1) ?? "mamba";
}

/** Reads `MAMBA_API_KEYS`: comma-separated keys, spaces around them ignored. */
function apiKeysEnv(): string[] {
  const keys = (Deno.env.get("MAMBA_API_KEYS") ?? "").split(",").map((key) => key.trim())
    .filter((key) => key !== "");
  for (const key of keys) {
    if (!/^[\x21-\x7e]+$/.test(key)) {
      throw new Error("MAMBA_API_KEYS must hold printable ASCII keys without spaces");
    }
  }
  return keys;
}

/** Fails now, before the model loads, when the address cannot be listened on. */
function checkListenable(hostname: string, port: number): void {
  if (port === 0) return;
  try {
    Deno.listen({ hostname, port }).close();
  } catch (error) {
    const reason = error instanceof Deno.errors.AddrInUse
      ? "the port is in use"
      : (error as Error).message;
    throw new Error(`Cannot listen on ${hostname}:${port}: ${reason}`);
  }
}

/** Loads the model the environment names and serves it until the process ends. */
export async function main(): Promise<void> {
  const port = integerEnv("PORT", 0) ?? 8000;
  if (port > 65535) throw new Error(`PORT must be 65535 or less, got ${port}`);
  const hostname = Deno.env.get("MAMBA_HOST") || "127.0.0.1";
  const apiKeys = apiKeysEnv();
  const maxPromptTokens = integerEnv("MAMBA_MAX_PROMPT_TOKENS");
  const maxNewTokens = integerEnv("MAMBA_MAX_NEW_TOKENS");
  const prefixCacheMegabytes = integerEnv("MAMBA_PREFIX_CACHE_MB", 0);
  const threads = integerEnv("MAMBA_THREADS");
  const backend = (Deno.env.get("MAMBA_BACKEND") || "auto") as BackendName;
  if (!BACKENDS.includes(backend)) {
    throw new Error(`MAMBA_BACKEND must be one of ${BACKENDS.join(", ")}, got ${backend}`);
  }
  const location = Deno.env.get("MAMBA_MODEL") ||
    new URL("../../models/tiny-shakespeare/", import.meta.url);
  const maxConcurrent = integerEnv("MAMBA_MAX_CONCURRENT");
  const maxConcurrentPerKey = integerEnv("MAMBA_MAX_CONCURRENT_PER_KEY");
  const sessions = await openSessionStore();
  checkListenable(hostname, port);
  const model = await loadModel(location, {
    backend,
    threads,
    // "auto" measures decoding at the batch the server runs at most (the handler's default: 8),
    // and the warm-up compiles the kernels of every batch up to it before the server listens.
    batch: maxConcurrent ?? 8,
  });
  const options: HandlerOptions = {
    modelName: modelNameOf(location),
    sessions,
    maxConcurrent,
    maxConcurrentPerKey,
    maxPromptTokens,
    maxNewTokens,
    prefixCacheBytes: (prefixCacheMegabytes ?? 64) * (1 << 20),
    apiKeys,
  };
  Deno.serve({
    port,
    hostname,
    onListen: ({ hostname, port }) =>
      console.error(
        `Serving ${location} (backend ${model.backend}) on http://${hostname}:${port}/` +
          (apiKeys.length > 0 ? ` for ${apiKeys.length} API keys` : " without API keys"),
      ),
  }, createHandler(model, options));
}

if (import.meta.main) {
  try {
    await main();
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exit(1);
  }
}
