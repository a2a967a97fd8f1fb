/**
 * Where the edge server keeps session snapshots between requests. A
 * {@link SessionStore} holds the bytes of `Session.snapshot()` under a session
 * id and hands out {@link SessionTurn}s: one request's exclusive use of a
 * session, from the snapshot it starts from to the snapshot it saves.
 *
 * {@link MemorySessionStore} keeps snapshots in this process (bounded, least
 * recently used evicted first). {@link KvSessionStore} keeps them in Deno KV,
 * so that they survive restarts and are shared by every process (or Deno
 * Deploy isolate) that opens the same database: a conversation may continue
 * on any of them, one turn at a time (see docs/edge-scale-out.md).
 *
 * @module
 */

/**
 * Thrown when a session is in a turn already: a request is generating in it,
 * in this process or (over Deno KV) in another one. The server replies 409.
 */
export class SessionBusyError extends Error {
  /** The session's id. */
  readonly id: string;

  /** The error for session `id`. */
  constructor(id: string) {
    super(`Session ${id} is generating a reply already`);
    this.name = "SessionBusyError";
    this.id = id;
  }
}

/**
 * Thrown by {@link SessionTurn.commit} when the session changed after the
 * turn began: its lease lapsed (the process stalled past it) and another
 * request took the session over, or the session was overwritten or deleted.
 * Nothing was saved; the session holds what the other request saved.
 */
export class SessionConflictError extends Error {
  /** The session's id. */
  readonly id: string;

  /** The error for session `id`. */
  constructor(id: string) {
    super(
      `Session ${id} was continued by another request while this one was generating; ` +
        "this reply was not saved",
    );
    this.name = "SessionConflictError";
    this.id = id;
  }
}

/**
 * One request's exclusive right to save a session's next state: no other
 * turn on the same id starts, and the id cannot be deleted, until this one
 * commits or is released.
 */
export interface SessionSave {
  /**
   * Saves `snapshot` as the session's new state and ends the turn. Throws
   * {@link SessionConflictError} (saving nothing) when the session changed
   * since the turn began.
   */
  commit(snapshot: Uint8Array): Promise<void>;
  /** Ends the turn leaving the session as it was; does nothing after `commit` or a first call. */
  release(): Promise<void>;
}

/** A turn on a stored session: the right to save its next state, and the state to continue from. */
export interface SessionTurn extends SessionSave {
  /** The session's latest snapshot when the turn began. */
  readonly snapshot: Uint8Array;
}

/**
 * Counters and sizes a store reports in the server's `GET /v1/stats`. Both
 * stores here report `turns` (turns begun on stored sessions; a new
 * session's first is not counted) and `busy` (turns and deletions
 * refused with {@link SessionBusyError}); {@link MemorySessionStore} adds
 * `sessions` and `bytes` held, {@link KvSessionStore} `conflicts` (commits
 * refused), `cacheHits` and `cacheMisses` (snapshots taken from this
 * process's cache, or read from KV), `cachedSessions` and `cachedBytes`.
 */
export type SessionStoreStats = Record<string, number>;

/** Storage of session snapshots by id. */
export interface SessionStore {
  /** The snapshot saved under `id`, or null when there is none. */
  get(id: string): Promise<Uint8Array | null>;
  /**
   * Saves `snapshot` under `id`, replacing any earlier one as a whole,
   * whatever turn is open on it (to seed a store; a server's sessions start
   * through {@link SessionStore.create} and continue through
   * {@link SessionStore.begin}). The store may keep `snapshot` itself: do not
   * modify it afterwards.
   */
  set(id: string, snapshot: Uint8Array): Promise<void>;
  /**
   * Removes the snapshot under `id`; false when there was none. Throws
   * {@link SessionBusyError} while a turn holds it.
   */
  delete(id: string): Promise<boolean>;
  /**
   * Starts the first turn of a new session `id`, which has no state yet:
   * until the turn commits (the first state) or is released (the id stays
   * unknown), a `begin` or `delete` of `id` is refused with
   * {@link SessionBusyError}, as during any later turn. Throws
   * {@link SessionBusyError} while a turn holds `id`, and an `Error` where
   * a session `id` exists.
   */
  create(id: string): Promise<SessionSave>;
  /**
   * Starts a turn on session `id`, with its latest snapshot; null when there
   * is no such session. Throws {@link SessionBusyError} while another turn
   * holds it.
   */
  begin(id: string): Promise<SessionTurn | null>;
  /** Counters for `GET /v1/stats`. */
  stats?(): SessionStoreStats;
}

/**
 * A map bounded by the bytes of its values; past the bound the least
 * recently used entries go first, except the newest one (so a bound of 0
 * still keeps one entry; callers that want none skip `set`).
 */
class LruBytes<V> {
  /** Insertion order of a Map is the recency order: each use re-inserts. */
  readonly #entries = new Map<string, V>();
  readonly #maxBytes: number;
  readonly #sizeOf: (value: V) => number;
  bytes = 0;

  constructor(maxBytes: number, sizeOf: (value: V) => number) {
    this.#maxBytes = maxBytes;
    this.#sizeOf = sizeOf;
  }

  get size(): number {
    return this.#entries.size;
  }

  get(id: string): V | undefined {
    const value = this.#entries.get(id);
    if (value === undefined) return undefined;
    this.#entries.delete(id);
    this.#entries.set(id, value);
    return value;
  }

  set(id: string, value: V): void {
    this.delete(id);
    this.#entries.set(id, value);
    this.bytes += this.#sizeOf(value);
    for (const oldest of this.#entries.keys()) {
      if (this.bytes <= this.#maxBytes || oldest === id) break;
      this.delete(oldest);
    }
  }

  delete(id: string): boolean {
    const value = this.#entries.get(id);
    if (value === undefined) return false;
    this.bytes -= this.#sizeOf(value);
    this.#entries.delete(id);
    return true;
  }
}

/** Options of {@link MemorySessionStore}. */
export interface MemorySessionStoreOptions {
  /** Bytes of snapshots kept at most; the least recently used go first (default 256 MiB). */
  maxBytes?: number;
}

/**
 * Snapshots in this process's memory. Past `maxBytes`, the least recently
 * used sessions are evicted (and become unknown ids); the newest one always
 * stays, so that a reply's session can be continued at least once.
 */
export class MemorySessionStore implements SessionStore {
  readonly #entries: LruBytes<Uint8Array>;
  /** Ids in a turn now. */
  readonly #turns = new Set<string>();
  readonly #counters = { turns: 0, busy: 0 };

  /** An empty store. */
  constructor(options: MemorySessionStoreOptions = {}) {
    this.#entries = new LruBytes(options.maxBytes ?? 256 << 20, (s) => s.byteLength);
  }

  /** Bytes of snapshots held now. */
  get bytes(): number {
    return this.#entries.bytes;
  }

  /** Sessions held now. */
  get size(): number {
    return this.#entries.size;
  }

  get(id: string): Promise<Uint8Array | null> {
    return Promise.resolve(this.#entries.get(id) ?? null);
  }

  set(id: string, snapshot: Uint8Array): Promise<void> {
    this.#entries.set(id, snapshot);
    return Promise.resolve();
  }

  delete(id: string): Promise<boolean> {
    if (this.#turns.has(id)) return Promise.reject(this.#busy(id));
    return Promise.resolve(this.#entries.delete(id));
  }

  create(id: string): Promise<SessionSave> {
    if (this.#turns.has(id)) return Promise.reject(this.#busy(id));
    if (this.#entries.get(id) !== undefined) {
      return Promise.reject(new Error(`Session ${id} exists already`));
    }
    return Promise.resolve(this.#turn(id));
  }

  begin(id: string): Promise<SessionTurn | null> {
    if (this.#turns.has(id)) return Promise.reject(this.#busy(id));
    const snapshot = this.#entries.get(id);
    if (snapshot === undefined) return Promise.resolve(null);
    this.#counters.turns++;
    return Promise.resolve({ ...this.#turn(id), snapshot });
  }

  stats(): SessionStoreStats {
    return { ...this.#counters, sessions: this.size, bytes: this.bytes };
  }

  #busy(id: string): SessionBusyError {
    this.#counters.busy++;
    return new SessionBusyError(id);
  }

  /** Holds `id` in a turn until the returned commit or release. */
  #turn(id: string): SessionSave {
    this.#turns.add(id);
    let open = true;
    const end = () => {
      const wasOpen = open;
      open = false;
      this.#turns.delete(id);
      return wasOpen;
    };
    return {
      commit: (next: Uint8Array) => {
        if (!end()) return Promise.reject(new Error(`The turn on session ${id} has ended`));
        return this.set(id, next);
      },
      release: () => {
        if (open) end();
        return Promise.resolve();
      },
    };
  }
}

/** Options of {@link KvSessionStore}. */
export interface KvSessionStoreOptions {
  /** First key part of every entry (default "mamba-sessions"). */
  prefix?: string;
  /** Milliseconds a session lives after its last save (default: forever). */
  expireInMs?: number;
  /**
   * Milliseconds a turn's lease lasts unless renewed; a turn renews it every
   * third of that while it runs. It is also how long a session stays busy
   * after the process running its turn died (default 15 000).
   */
  leaseMs?: number;
  /**
   * Bytes of snapshots kept in this process, each used only while it is the
   * version KV names as current; 0 keeps none (default 64 MiB).
   */
  cacheBytes?: number;
}

/** What the head key of a session holds: which version of the chunks is current. */
interface KvHead {
  version: string;
  chunks: number;
  bytes: number;
}

/** What the lease key of a session holds while a turn is open on it. */
interface KvLease {
  /** A random id of the turn holding it. */
  owner: string;
  /** Date.now() after which it is void unless renewed. */
  expiresAt: number;
}

/** A snapshot kept in this process, with the version of the head it is the chunks of. */
interface Cached {
  version: string;
  snapshot: Uint8Array;
}

/** KV values are at most 64 KiB; a chunk leaves room for the value's encoding. */
const CHUNK_BYTES = 60 * 1024;
/** Chunks per atomic write: an atomic operation carries at most 800 KiB of mutations. */
const CHUNKS_PER_COMMIT = 12;
/** Reads retried when a concurrent save replaced the chunks being read. */
const READ_ATTEMPTS = 4;
/** Attempts at a conditional write whose checks other writers keep failing. */
const WRITE_ATTEMPTS = 8;
/** Third key part of a session's lease (versions are UUIDs, so never this). */
const LEASE = "lease";
/** Attempts at a KV operation that SQLite reports busy. */
const BUSY_ATTEMPTS = 50;

function isLive(lease: KvLease | null): lease is KvLease {
  return lease !== null && lease.expiresAt > Date.now();
}

/** Whether `error` is SQLite's SQLITE_BUSY, which a local KV file gives under contention. */
function isBusy(error: unknown): boolean {
  return error instanceof Error && /database is (locked|busy)/i.test(error.message);
}

/**
 * `operation()`, run again while it fails with SQLITE_BUSY. Deno's local KV
 * retries most of those itself, but not all: under contention between
 * processes (or handles) on one file, a read or a commit occasionally
 * throws "database is locked". A failed transaction has no effect, so
 * running it again is safe.
 */
export async function retryWhileBusy<T>(operation: () => Promise<T>): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await operation();
    } catch (error) {
      if (!isBusy(error) || attempt === BUSY_ATTEMPTS) throw error;
      await new Promise((resolve) => setTimeout(resolve, 5 + Math.random() * 20));
    }
  }
}

/**
 * `Deno.openKv(path)`, retried while the file is busy (two processes
 * opening a new database at once can see SQLITE_BUSY).
 */
export function openKv(path?: string): Promise<Deno.Kv> {
  return retryWhileBusy(() => Deno.openKv(path));
}

/** The KV operations the store uses, each retried while SQLite is busy. */
class RetryingKv {
  constructor(readonly kv: Deno.Kv) {}

  get<T>(key: Deno.KvKey): Promise<Deno.KvEntryMaybe<T>> {
    return retryWhileBusy(() => this.kv.get<T>(key));
  }

  getMany<T extends readonly unknown[]>(
    keys: readonly [...{ [K in keyof T]: Deno.KvKey }],
  ): Promise<{ [K in keyof T]: Deno.KvEntryMaybe<T[K]> }> {
    return retryWhileBusy(() => this.kv.getMany<T>(keys));
  }

  /** Every entry under `prefix`, read in one go. */
  list<T>(prefix: Deno.KvKey): Promise<Deno.KvEntry<T>[]> {
    return retryWhileBusy(() => Array.fromAsync(this.kv.list<T>({ prefix })));
  }

  /** Commits the atomic operation `build` fills in (built anew for each attempt). */
  commit(
    build: (op: Deno.AtomicOperation) => Deno.AtomicOperation,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
    return retryWhileBusy(() => build(this.kv.atomic()).commit());
  }
}

/**
 * Snapshots in Deno KV, shared by every process that opens the database.
 *
 * Layout. A snapshot (about 3 MB for mamba-130m) is larger than KV's 64 KiB
 * value limit and 800 KiB atomic-operation limit, so it is split:
 *
 * - `[prefix, id, version, i]` holds chunk i of one version of the snapshot;
 * - `[prefix, id]` (the head) names the current version;
 * - `[prefix, id, "lease"]` exists while a turn is open on the session.
 *
 * A save writes the chunks of a new version (invisible so far), then swaps
 * the head in one atomic operation, then deletes the chunks of the version it
 * replaced. Readers therefore see either the old or the new snapshot, never a
 * mix; a reader whose chunks were deleted under it reads the head again.
 *
 * Turns. {@link KvSessionStore.begin} takes the lease with an atomic check
 * that no live lease exists (a lapsed one, left by a process that died, is
 * taken over), and the turn renews it every third of `leaseMs`. A second
 * turn on the session, here or in another process, is refused with
 * {@link SessionBusyError} at once, before it generates anything. The
 * commit swaps the head only if it is still the one the turn began from (a
 * fencing check) and no other turn holds a live lease, so a process that
 * stalled past its lease cannot overwrite the work of the one that took
 * over: it gets {@link SessionConflictError} instead. A new session's first
 * turn ({@link KvSessionStore.create}) takes the lease while the session has
 * no head yet, so a `begin` or `delete` of its id is refused meanwhile too.
 *
 * Cache. Snapshots read or written here are kept in this process under the
 * version they are; a turn or `get` first reads the head from KV (strongly
 * consistent) and uses the cached bytes only when they are that version, so
 * a session continued elsewhere in between is always read anew.
 */
export class KvSessionStore implements SessionStore {
  readonly #kv: RetryingKv;
  readonly #prefix: string;
  readonly #expireIn: number | undefined;
  readonly #leaseMs: number;
  readonly #cacheBytes: number;
  readonly #cache: LruBytes<Cached>;
  readonly #counters = { cacheHits: 0, cacheMisses: 0, busy: 0, conflicts: 0, turns: 0 };

  /** A store over an open KV database, which the caller closes. */
  constructor(kv: Deno.Kv, options: KvSessionStoreOptions = {}) {
    this.#kv = new RetryingKv(kv);
    this.#prefix = options.prefix ?? "mamba-sessions";
    this.#expireIn = options.expireInMs;
    this.#leaseMs = options.leaseMs ?? 15_000;
    if (!(this.#leaseMs >= 3)) throw new RangeError("leaseMs must be 3 or more");
    this.#cacheBytes = options.cacheBytes ?? 64 << 20;
    this.#cache = new LruBytes(this.#cacheBytes, (c) => c.snapshot.byteLength);
  }

  async get(id: string): Promise<Uint8Array | null> {
    for (let attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
      const head = await this.#kv.get<KvHead>(this.#headKey(id));
      if (head.value === null) {
        this.#cache.delete(id);
        return null;
      }
      const snapshot = await this.#load(id, head.value);
      if (snapshot !== null) return snapshot;
      // Replaced (or expired) while being read: try the current head.
    }
    throw new Error(`Session ${id} kept changing while being read from Deno KV`);
  }

  async set(id: string, snapshot: Uint8Array): Promise<void> {
    const version = crypto.randomUUID();
    let head: KvHead;
    try {
      head = await this.#writeChunks(id, version, snapshot);
    } catch (error) {
      await this.#deleteVersion(id, version).catch(() => {});
      throw error;
    }
    // Swap the head only over the one it read, so the version it replaces is known and freed.
    for (;;) {
      const previous = await this.#kv.get<KvHead>(this.#headKey(id));
      // Swapped by an attempt that reported a failure (retried while busy): done.
      if (previous.value?.version === version) break;
      const swapped = await this.#kv.commit((op) =>
        op.check(previous).set(this.#headKey(id), head, this.#entryOptions())
      );
      if (swapped.ok) {
        this.#remember(id, head.version, snapshot);
        if (previous.value) await this.#deleteVersion(id, previous.value.version);
        return;
      }
    }
    this.#remember(id, version, snapshot);
  }

  async delete(id: string): Promise<boolean> {
    for (;;) {
      const [head, lease] = await this.#kv.getMany<[KvHead, KvLease]>([
        this.#headKey(id),
        this.#leaseKey(id),
      ]);
      // A new session's first turn holds the lease before any state exists.
      this.#refuseWhileLeased(id, lease.value);
      if (head.value === null) {
        this.#cache.delete(id);
        return false;
      }
      const removed = await this.#kv.commit((op) =>
        op.check(head).check(lease).delete(this.#headKey(id)).delete(this.#leaseKey(id))
      );
      if (removed.ok) {
        this.#cache.delete(id);
        await this.#deleteVersion(id, head.value.version);
        return true;
      }
    }
  }

  async create(id: string): Promise<SessionSave> {
    const owner = crypto.randomUUID();
    for (let attempt = 0; attempt < WRITE_ATTEMPTS; attempt++) {
      const [head, lease] = await this.#kv.getMany<[KvHead, KvLease]>([
        this.#headKey(id),
        this.#leaseKey(id),
      ]);
      if (head.value !== null) throw new Error(`Session ${id} exists already`);
      // The lease, while the session still has no head.
      const leaseStamp = await this.#takeLease(id, owner, head, lease);
      if (leaseStamp === null) continue; // Another request took it, or a save landed: look again.
      return this.#turn(id, owner, head, leaseStamp);
    }
    throw new Error(`Session ${id} kept changing while its first turn was starting`);
  }

  async begin(id: string): Promise<SessionTurn | null> {
    const owner = crypto.randomUUID();
    for (let attempt = 0; attempt < WRITE_ATTEMPTS; attempt++) {
      const [head, lease] = await this.#kv.getMany<[KvHead, KvLease]>([
        this.#headKey(id),
        this.#leaseKey(id),
      ]);
      if (head.value === null) {
        // A new session's first turn holds the lease before any state exists.
        this.#refuseWhileLeased(id, lease.value);
        this.#cache.delete(id);
        return null;
      }
      const leaseStamp = await this.#takeLease(id, owner, head, lease);
      if (leaseStamp === null) continue; // Another turn took it, or a save landed: look again.
      const turn = this.#turn(id, owner, head, leaseStamp);
      let snapshot: Uint8Array | null;
      try {
        snapshot = await this.#load(id, head.value);
      } catch (error) {
        await turn.release();
        throw error;
      }
      if (snapshot !== null) {
        this.#counters.turns++;
        return { ...turn, snapshot };
      }
      // The head's chunks are gone (expired, or replaced by a plain set()).
      await turn.release();
      const now = await this.#kv.get<KvHead>(this.#headKey(id));
      if (now.versionstamp === head.versionstamp) return null; // Expiring: as good as gone.
    }
    throw new Error(`Session ${id} kept changing while a turn on it was starting`);
  }

  stats(): SessionStoreStats {
    return {
      ...this.#counters,
      cachedSessions: this.#cache.size,
      cachedBytes: this.#cache.bytes,
    };
  }

  /** Throws {@link SessionBusyError} (and counts it) while `lease` is live. */
  #refuseWhileLeased(id: string, lease: KvLease | null): void {
    if (isLive(lease)) {
      this.#counters.busy++;
      throw new SessionBusyError(id);
    }
  }

  /**
   * Takes the lease of session `id` for `owner`, over no lease or a lapsed
   * one, and only while `head` and `lease` are as just read: its
   * versionstamp, or null where another writer moved either first. Throws
   * {@link SessionBusyError} while another turn's lease is live.
   */
  async #takeLease(
    id: string,
    owner: string,
    head: Deno.KvEntryMaybe<KvHead>,
    lease: Deno.KvEntryMaybe<KvLease>,
  ): Promise<string | null> {
    // Taken by an attempt that reported a failure (retried while busy).
    if (lease.value?.owner === owner) return lease.versionstamp!;
    this.#refuseWhileLeased(id, lease.value);
    const taken = await this.#kv.commit((op) =>
      op.check(head).check(lease)
        .set(this.#leaseKey(id), this.#leaseValue(owner), { expireIn: this.#leaseMs })
    );
    return taken.ok ? taken.versionstamp : null;
  }

  /**
   * The commit and release of a turn that holds the lease `[owner,
   * leaseStamp]` over `head` (no head: a new session's first turn); renews
   * the lease until either is called.
   */
  #turn(
    id: string,
    owner: string,
    head: Deno.KvEntryMaybe<KvHead>,
    leaseStamp: string,
  ): SessionSave {
    const kv = this.#kv;
    const leaseKey = this.#leaseKey(id);
    const leaseMs = this.#leaseMs;
    let open = true;
    let renewing: Promise<void> = Promise.resolve();
    const renew = async () => {
      if (!open) return;
      const renewed = await kv.commit((op) =>
        op.check({ key: leaseKey, versionstamp: leaseStamp })
          .set(leaseKey, this.#leaseValue(owner), { expireIn: leaseMs })
      );
      if (renewed.ok) {
        leaseStamp = renewed.versionstamp;
        return;
      }
      const lease = await kv.get<KvLease>(leaseKey);
      if (lease.value?.owner === owner) {
        leaseStamp = lease.versionstamp!; // Renewed by an attempt that reported a failure.
      } else {
        // Taken over after it lapsed: the commit will find out whose turn it is.
        clearInterval(timer);
      }
    };
    const timer = setInterval(() => {
      renewing = renewing.then(renew).catch((error) => {
        // Retried at the next tick; the lease lapses if KV stays unreachable.
        console.error(`Could not renew the lease of session ${id}:`, error);
      });
    }, Math.floor(leaseMs / 3));
    Deno.unrefTimer(timer);
    /** Stops renewing; resolves once no renewal is in flight. */
    const stop = async () => {
      open = false;
      clearInterval(timer);
      await renewing;
    };
    /** Deletes the lease if it is still this turn's. */
    const dropLease = async () => {
      const lease = await kv.get<KvLease>(leaseKey);
      if (lease.value?.owner === owner) await kv.commit((op) => op.check(lease).delete(leaseKey));
    };

    const commit = async (snapshot: Uint8Array) => {
      if (!open) throw new Error(`The turn on session ${id} has ended`);
      await stop();
      const version = crypto.randomUUID();
      try {
        const written = await this.#writeChunks(id, version, snapshot);
        for (let attempt = 0;; attempt++) {
          const [current, lease] = await kv.getMany<[KvHead, KvLease]>([
            this.#headKey(id),
            leaseKey,
          ]);
          // Saved by an attempt that reported a failure (retried while busy).
          if (current.value?.version === version) break;
          if (
            current.versionstamp !== head.versionstamp || attempt === WRITE_ATTEMPTS ||
            (lease.value?.owner !== owner && isLive(lease.value))
          ) {
            throw new SessionConflictError(id);
          }
          const saved = await kv.commit((op) =>
            op.check(head).check(lease)
              .set(this.#headKey(id), written, this.#entryOptions())
              .delete(leaseKey)
          );
          if (saved.ok) break;
          // The lease or the head moved in between: look again.
        }
      } catch (error) {
        // A write that failed ambiguously (a remote KV's network error) may have swapped the
        // head: its chunks are deleted only once the head is known not to name them.
        const current = await kv.get<KvHead>(this.#headKey(id)).catch(() => null);
        if (current?.value?.version !== version) {
          if (error instanceof SessionConflictError) this.#counters.conflicts++;
          if (current !== null) await this.#deleteVersion(id, version).catch(() => {});
          await dropLease().catch(() => {});
          throw error;
        }
      }
      this.#remember(id, version, snapshot);
      if (head.value !== null) await this.#deleteVersion(id, head.value.version);
    };

    const release = async () => {
      if (!open) return;
      await stop();
      await dropLease();
    };
    return { commit, release };
  }

  /** The snapshot `head` names: from the cache when it is that version, else from KV. */
  async #load(id: string, head: KvHead): Promise<Uint8Array | null> {
    const cached = this.#cache.get(id);
    if (cached?.version === head.version) {
      this.#counters.cacheHits++;
      return cached.snapshot;
    }
    this.#counters.cacheMisses++;
    const snapshot = await this.#readChunks(id, head);
    if (snapshot !== null) this.#remember(id, head.version, snapshot);
    return snapshot;
  }

  /** The chunks of `head`'s version, or null when some are gone (replaced or expired). */
  async #readChunks(id: string, { version, chunks, bytes }: KvHead): Promise<Uint8Array | null> {
    const snapshot = new Uint8Array(bytes);
    let offset = 0;
    let count = 0;
    for (const entry of await this.#kv.list<Uint8Array>([this.#prefix, id, version])) {
      if (offset + entry.value.byteLength > bytes) return null;
      snapshot.set(entry.value, offset);
      offset += entry.value.byteLength;
      count++;
    }
    return count === chunks && offset === bytes ? snapshot : null;
  }

  /** Writes `snapshot` as the chunks of `version` (new: no head names it yet). */
  async #writeChunks(id: string, version: string, snapshot: Uint8Array): Promise<KvHead> {
    const chunks = Math.ceil(snapshot.byteLength / CHUNK_BYTES);
    const options = this.#entryOptions();
    for (let first = 0; first < chunks; first += CHUNKS_PER_COMMIT) {
      await this.#commit((op) => {
        for (let i = first; i < Math.min(chunks, first + CHUNKS_PER_COMMIT); i++) {
          const piece = snapshot.subarray(i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES);
          op.set([this.#prefix, id, version, i], piece, options);
        }
        return op;
      });
    }
    return { version, chunks, bytes: snapshot.byteLength };
  }

  async #deleteVersion(id: string, version: string): Promise<void> {
    const keys = (await this.#kv.list([this.#prefix, id, version])).map((entry) => entry.key);
    for (let first = 0; first < keys.length; first += 100) {
      await this.#commit((op) => {
        for (const key of keys.slice(first, first + 100)) op.delete(key);
        return op;
      });
    }
  }

  async #commit(build: (op: Deno.AtomicOperation) => Deno.AtomicOperation): Promise<void> {
    const result = await this.#kv.commit(build);
    // Only checks can fail a commit, and these operations have none.
    if (!result.ok) throw new Error("A Deno KV write without checks was refused");
  }

  #remember(id: string, version: string, snapshot: Uint8Array): void {
    if (this.#cacheBytes > 0) this.#cache.set(id, { version, snapshot });
  }

  #headKey(id: string): Deno.KvKey {
    return [this.#prefix, id];
  }

  #leaseKey(id: string): Deno.KvKey {
    return [this.#prefix, id, LEASE];
  }

  #leaseValue(owner: string): KvLease {
    return { owner, expiresAt: Date.now() + this.#leaseMs };
  }

  #entryOptions(): { expireIn: number } | undefined {
    return this.#expireIn === undefined ? undefined : { expireIn: this.#expireIn };
  }
}
