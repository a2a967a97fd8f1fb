/**
 * Where the edge server keeps session snapshots between requests: a
 * {@link SessionStore} holds the bytes of `Session.snapshot()` under a session
 * id. {@link MemorySessionStore} keeps them in this process (bounded, least
 * recently used evicted first); {@link KvSessionStore} keeps them in Deno KV,
 * so that they survive restarts and are shared between Deno Deploy isolates.
 *
 * @module
 */

/** Storage of session snapshots by id. */
export interface SessionStore {
  /** The snapshot saved under `id`, or null when there is none. */
  get(id: string): Promise<Uint8Array | null>;
  /** Saves `snapshot` under `id`, replacing any earlier one as a whole. */
  set(id: string, snapshot: Uint8Array): Promise<void>;
  /** Removes the snapshot under `id`; false when there was none. */
  delete(id: string): Promise<boolean>;
}

/** Options of {@link MemorySessionStore}. */
export interface MemorySessionStoreOptions {
  /** Bytes of snapshots kept at most; the least recently used go first (default 256 MiB). */
  maxBytes?: number;
}

/**
 * Snapshots in this process's memory. Past `maxBytes`, the least recently
 * used sessions are evicted (and become unknown ids).
 */
export class MemorySessionStore implements SessionStore {
  /** Insertion order of a Map is the recency order: each use re-inserts. */
  readonly #entries = new Map<string, Uint8Array>();
  readonly #maxBytes: number;
  #bytes = 0;

  /** An empty store. */
  constructor(options: MemorySessionStoreOptions = {}) {
    this.#maxBytes = options.maxBytes ?? 256 << 20;
  }

  /** Bytes of snapshots held now. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Sessions held now. */
  get size(): number {
    return this.#entries.size;
  }

  get(id: string): Promise<Uint8Array | null> {
    const snapshot = this.#entries.get(id);
    if (snapshot === undefined) return Promise.resolve(null);
    this.#entries.delete(id);
    this.#entries.set(id, snapshot);
    return Promise.resolve(snapshot);
  }

  set(id: string, snapshot: Uint8Array): Promise<void> {
    this.#remove(id);
    this.#entries.set(id, snapshot);
    this.#bytes += snapshot.byteLength;
    // The newest entry stays even when it alone is over the limit: a reply's
    // session must be continuable at least once.
    for (const oldest of this.#entries.keys()) {
      if (this.#bytes <= this.#maxBytes || oldest === id) break;
      this.#remove(oldest);
    }
    return Promise.resolve();
  }

  delete(id: string): Promise<boolean> {
    return Promise.resolve(this.#remove(id));
  }

  #remove(id: string): boolean {
    const snapshot = this.#entries.get(id);
    if (snapshot === undefined) return false;
    this.#bytes -= snapshot.byteLength;
    this.#entries.delete(id);
    return true;
  }
}

/** Options of {@link KvSessionStore}. */
export interface KvSessionStoreOptions {
  /** First key part of every entry (default "mamba-sessions"). */
  prefix?: string;
  /** Milliseconds a session lives after its last save (default: forever). */
  expireInMs?: number;
}

/** What the head key of a session holds: which version of the chunks is current. */
interface KvHead {
  version: string;
  chunks: number;
  bytes: number;
}

/** KV values are at most 64 KiB; a chunk leaves room for the value's encoding. */
const CHUNK_BYTES = 60 * 1024;
/** Chunks per atomic write: an atomic operation carries at most 800 KiB of mutations. */
const CHUNKS_PER_COMMIT = 12;
/** Reads retried when a concurrent save replaced the chunks being read. */
const READ_ATTEMPTS = 4;

/**
 * Snapshots in Deno KV. A snapshot (about 3 MB for mamba-130m) is larger than
 * KV's 64 KiB value limit and 800 KiB atomic-operation limit, so it is split:
 *
 * - `[prefix, id, version, i]` holds chunk i of one version of the snapshot;
 * - `[prefix, id]` (the head) names the current version.
 *
 * A save writes the chunks of a new version (invisible so far), then swaps
 * the head in one atomic operation, then deletes the chunks of the version it
 * replaced. Readers therefore see either the old or the new snapshot, never a
 * mix; a reader whose chunks were deleted under it reads the head again.
 * Concurrent saves of one id are last-writer-wins.
 */
export class KvSessionStore implements SessionStore {
  readonly #kv: Deno.Kv;
  readonly #prefix: string;
  readonly #expireIn: number | undefined;

  /** A store over an open KV database, which the caller closes. */
  constructor(kv: Deno.Kv, options: KvSessionStoreOptions = {}) {
    this.#kv = kv;
    this.#prefix = options.prefix ?? "mamba-sessions";
    this.#expireIn = options.expireInMs;
  }

  async get(id: string): Promise<Uint8Array | null> {
    for (let attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
      const head = await this.#kv.get<KvHead>([this.#prefix, id]);
      if (head.value === null) return null;
      const { version, chunks, bytes } = head.value;
      const snapshot = new Uint8Array(bytes);
      let offset = 0;
      let count = 0;
      for await (
        const entry of this.#kv.list<Uint8Array>({ prefix: [this.#prefix, id, version] })
      ) {
        snapshot.set(entry.value, offset);
        offset += entry.value.byteLength;
        count++;
      }
      if (count === chunks && offset === bytes) return snapshot;
      // Replaced (or expired) while being read: try the current head.
    }
    throw new Error(`Session ${id} kept changing while being read from Deno KV`);
  }

  async set(id: string, snapshot: Uint8Array): Promise<void> {
    const version = crypto.randomUUID();
    const chunks = Math.ceil(snapshot.byteLength / CHUNK_BYTES);
    const options = this.#expireIn === undefined ? undefined : { expireIn: this.#expireIn };
    for (let first = 0; first < chunks; first += CHUNKS_PER_COMMIT) {
      const op = this.#kv.atomic();
      for (let i = first; i < Math.min(chunks, first + CHUNKS_PER_COMMIT); i++) {
        const piece = snapshot.subarray(i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES);
        op.set([this.#prefix, id, version, i], piece, options);
      }
      await this.#commit(op);
    }
    const head: KvHead = { version, chunks, bytes: snapshot.byteLength };
    // Swap the head only over the one it read, so the version it replaces is known and freed.
    for (;;) {
      const previous = await this.#kv.get<KvHead>([this.#prefix, id]);
      const swapped = await this.#kv.atomic()
        .check(previous)
        .set([this.#prefix, id], head, options)
        .commit();
      if (swapped.ok) {
        if (previous.value) await this.#deleteVersion(id, previous.value.version);
        return;
      }
    }
  }

  async delete(id: string): Promise<boolean> {
    for (;;) {
      const head = await this.#kv.get<KvHead>([this.#prefix, id]);
      if (head.value === null) return false;
      const removed = await this.#kv.atomic().check(head).delete([this.#prefix, id]).commit();
      if (removed.ok) {
        await this.#deleteVersion(id, head.value.version);
        return true;
      }
    }
  }

  async #deleteVersion(id: string, version: string): Promise<void> {
    let op = this.#kv.atomic();
    let pending = 0;
    for await (const entry of this.#kv.list({ prefix: [this.#prefix, id, version] })) {
      op.delete(entry.key);
      if (++pending === 100) {
        await this.#commit(op);
        op = this.#kv.atomic();
        pending = 0;
      }
    }
    if (pending > 0) await this.#commit(op);
  }

  async #commit(op: Deno.AtomicOperation): Promise<void> {
    const result = await op.commit();
    // Only checks can fail a commit, and these operations have none.
    if (!result.ok) throw new Error("A Deno KV write without checks was refused");
  }
}
