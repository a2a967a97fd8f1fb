/**
 * A cache of model states after prompt prefixes. After prefilling a prompt the
 * server stores the session's snapshot under (model, token ids); a later
 * prompt that starts with those ids resumes from the snapshot and prefills
 * only the rest. Mamba's state has a fixed size, so an entry costs the same
 * whatever the prefix length. The cache is bounded by bytes, evicting the
 * least recently used entry first.
 *
 * @module
 */

/** Counters and sizes of a {@link PrefixCache}. */
export interface PrefixCacheStats {
  /** Lookups that found a cached prefix. */
  hits: number;
  /** Lookups that found none. */
  misses: number;
  /** Entries held. */
  entries: number;
  /** Bytes of snapshots held. */
  bytes: number;
  /** The bound on `bytes`. */
  maxBytes: number;
}

/** A cached state: the ids it is the state after, and the session snapshot. */
export interface PrefixHit {
  /** The cached prefix's ids (a prefix of the looked-up ids). */
  ids: readonly number[];
  /** The snapshot of a session that has consumed exactly `ids`. */
  snapshot: Uint8Array;
}

interface Entry extends PrefixHit {
  model: string;
}

/**
 * The key of a prefix: two 32-bit FNV-1a-style hashes of the model's name and
 * the ids. Keys are computed for every prefix length in one pass; an entry's
 * model and ids are compared on a hit, so a hash collision can only cost a miss.
 */
function* prefixKeys(model: string, ids: readonly number[]): Generator<[number, string]> {
  let a = 0x811c9dc5;
  for (let i = 0; i < model.length; i++) a = Math.imul(a ^ model.charCodeAt(i), 0x01000193) >>> 0;
  let b = a ^ 0x01000193;
  for (let i = 0; i < ids.length; i++) {
    a = Math.imul(a ^ ids[i], 0x01000193) >>> 0;
    b = Math.imul(b ^ (ids[i] + i), 0x5bd1e995) >>> 0;
    yield [i + 1, `${a.toString(36)}.${b.toString(36)}`];
  }
}

/** A byte-bounded LRU map from (model, token-id prefix) to a session snapshot. */
export class PrefixCache {
  /** Insertion order of a Map is the recency order: each use re-inserts. */
  readonly #entries = new Map<string, Entry>();
  readonly #maxBytes: number;
  #bytes = 0;
  #hits = 0;
  #misses = 0;

  /** An empty cache holding at most `maxBytes` of snapshots (0 disables it). */
  constructor(maxBytes: number) {
    this.#maxBytes = maxBytes;
  }

  /** Whether the cache keeps anything (a size of 0 disables it). */
  get enabled(): boolean {
    return this.#maxBytes > 0;
  }

  /** The longest cached prefix of `ids` for `model`, or null; counts a hit or a miss. */
  lookup(model: string, ids: readonly number[]): PrefixHit | null {
    let best: { key: string; entry: Entry } | null = null;
    if (this.#entries.size > 0) {
      for (const [length, key] of prefixKeys(model, ids)) {
        const entry = this.#entries.get(key);
        if (
          entry && entry.model === model && entry.ids.length === length &&
          entry.ids.every((id, i) => id === ids[i])
        ) {
          best = { key, entry };
        }
      }
    }
    if (best === null) {
      this.#misses++;
      return null;
    }
    this.#hits++;
    this.#entries.delete(best.key);
    this.#entries.set(best.key, best.entry);
    return best.entry;
  }

  /** Stores the snapshot of a session that has consumed exactly `ids`. */
  store(model: string, ids: readonly number[], snapshot: Uint8Array): void {
    if (ids.length === 0 || snapshot.byteLength > this.#maxBytes) return;
    let key = "";
    for (const [, prefixKey] of prefixKeys(model, ids)) key = prefixKey;
    this.#remove(key);
    this.#entries.set(key, { model, ids: [...ids], snapshot });
    this.#bytes += snapshot.byteLength;
    for (const oldest of this.#entries.keys()) {
      if (this.#bytes <= this.#maxBytes) break;
      this.#remove(oldest);
    }
  }

  /** Counters since creation and the current size. */
  stats(): PrefixCacheStats {
    return {
      hits: this.#hits,
      misses: this.#misses,
      entries: this.#entries.size,
      bytes: this.#bytes,
      maxBytes: this.#maxBytes,
    };
  }

  #remove(key: string): void {
    const entry = this.#entries.get(key);
    if (entry === undefined) return;
    this.#bytes -= entry.snapshot.byteLength;
    this.#entries.delete(key);
  }
}
