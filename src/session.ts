/**
 * A {@link Session} is one sequence being read or written: the model's
 * recurrent state, the ids consumed so far and the logits of the last one.
 * Its whole content round-trips through a `Uint8Array` snapshot, so a
 * conversation can be stored and resumed anywhere.
 *
 * Snapshot layout (little-endian): the 8 ASCII bytes `MAMBASS2`, then u32
 * fields nLayer, dConv, dInner, dState, vocabSize, the model's identity
 * ({@link MambaModel.identity}), tokenCount, hasLogits; then tokenCount i32
 * ids (the last {@link SNAPSHOT_IDS} consumed, for stop strings and
 * repetition penalties); then vocabSize f32 logits when hasLogits is 1; then
 * per layer the conv state [dConv - 1, dInner] and the SSM state [dInner, N]
 * as f32; last, the CRC-32 of every byte before it. Restoring checks all of
 * it, and that every float is finite.
 *
 * @module
 */

import { engineFor, type Verdict } from "./engine.ts";
import { convChannels } from "./config.ts";
import type { MambaModel } from "./model.ts";
import type { StatePool } from "./pool.ts";
import { Sampler } from "./sampler.ts";
import { SnapshotError } from "./errors.ts";
import { crc32 } from "./checksum.ts";

const MAGIC = "MAMBASS2";
const HEADER_BYTES = 8 + 8 * 4;
const CHECKSUM_BYTES = 4;

/**
 * Ids a snapshot keeps, the latest: a resumed session's stop strings and
 * repetition penalties look back at most this far, and a snapshot does not
 * grow with the conversation.
 */
export const SNAPSHOT_IDS = 4096;

/** What a session can be restored from: a snapshot's bytes, in any binary form. */
export type SnapshotBytes = Uint8Array | ArrayBuffer | ArrayBufferView;

export { SnapshotError };

/** Options of {@link Session.greedy} and {@link Session.sample}. */
export interface DecodeOptions {
  /** Only ids below this are chosen (default: the whole vocabulary). */
  limit?: number;
  /** Stops before the first id for which this is true; that id is not fed. */
  stopBefore?: (id: number) => boolean;
  /** Called with the ids fed, in order, as they arrive (a decode round's at a time). */
  onIds?: (ids: number[]) => void;
}

/** Options of {@link Session.decode}: the general form of {@link Session.greedy} and {@link Session.sample}. */
export interface SessionDecodeOptions {
  /** Ids to feed first (a prompt); without them the session must have been fed before. */
  prompt?: readonly number[] | Int32Array;
  /** Picks the ids, with its options and random numbers (a temperature of 0 is greedy). */
  sampler: Sampler;
  /** Ids to pick at most. */
  maxTokens: number;
  /** Only ids below this are chosen (default: the whole vocabulary). */
  limit?: number;
  /**
   * Judges each picked id, in order: "continue", "stop-before" (it is not
   * fed, and decoding ends) or "stop-after" (it is fed, and decoding ends).
   * Default: always "continue".
   */
  judge?: (id: number) => Verdict;
  /** Called with the ids kept, in order, as they arrive (a decode round's at a time). */
  onIds?: (ids: number[]) => void;
}

/** Decoded snapshot contents, validated against a model's sizes. */
interface SnapshotData {
  tokens: number[];
  logits: Float32Array | null;
  conv: Float32Array[];
  ssm: Float32Array[];
}

/** Gives the slot of a session that was dropped without `dispose` back to its pool. */
const slotsLeft = new FinalizationRegistry<{ pool: StatePool<unknown>; slot: number }>(
  ({ pool, slot }) => pool.release(slot),
);

/**
 * One sequence's recurrent state on a model: a slot of the model's state
 * pool, with the ids consumed so far. Every call that feeds or decodes goes
 * through the model's decode engine, so concurrent sessions step together.
 * A session's calls run one after the other, in the order they were made.
 */
export class Session<Buf = unknown> {
  readonly #model: MambaModel<Buf>;
  #slot: number;
  /** Whether the slot is in use ("held"), may be taken back ("parked") or was ("given up"). */
  #slotState: "held" | "parked" | "given up" = "held";
  /** Whether {@link tokens} is every id since a zero state, so that feeding them again rebuilds it. */
  readonly #wholeHistory: boolean;
  #tokens: number[] = [];
  /** Whether the slot's logits row holds the logits after the last id. */
  #hasLogits = false;
  /** A host copy of those logits, where read. */
  #lastLogits: Float32Array | null = null;
  /** Restoring from a snapshot that was still being taken; settled before any use. */
  #pending: Promise<void> | null = null;
  /** Serializes calls so overlapping calls cannot interleave. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Calls made and not yet settled. */
  #calls = 0;
  /** Whether the slot is parked whenever no call is running (see {@link park}). */
  #parkWhenIdle = false;
  #disposed = false;

  /**
   * A fresh session, or one resumed from `snapshot` (a promise is accepted, so
   * `model.session(other.snapshot())` works without an await).
   */
  constructor(model: MambaModel<Buf>, snapshot?: SnapshotBytes | Promise<SnapshotBytes>) {
    this.#model = model;
    const pending = isPromiseLike(snapshot) ? snapshot : null;
    // Checked before a slot is taken, so a bad snapshot costs no memory.
    const data = snapshot === undefined || pending
      ? null
      : decodeSnapshot(asBytes(snapshot), model);
    this.#wholeHistory = snapshot === undefined;
    this.#slot = this.#acquire();
    if (data) this.#restore(data);
    if (pending) {
      this.#pending = Promise.resolve(pending).then(
        (bytes) => this.#restore(decodeSnapshot(asBytes(bytes), model)),
      ).catch((error) => {
        this.dispose(); // The slot goes back now, not when the session is collected.
        throw error;
      });
      this.#pending.catch(() => {}); // Reported by the first call that awaits it.
    }
  }

  /**
   * The ids consumed so far (prompt and generated), oldest first. A session
   * made from a snapshot promise shows them once that promise has settled
   * (after the first awaited call).
   */
  get tokens(): readonly number[] {
    return this.#tokens;
  }

  /** The session's slot in the model's state pool; -1 while it is given up (see {@link park}). */
  get slot(): number {
    return this.#slot;
  }

  /**
   * From now on, lets the model's state pool take this session's slot back
   * while no call of the session is running, when the pool runs out of slots
   * (the slot parked longest ago first), rather than grow. A session that
   * gave its slot up takes another at its next call and feeds its ids again
   * first: it continues from the same ids, its state and logits equal up to
   * float rounding (a prompt's path sums in another order than decode
   * steps). `generate` parks the sessions it makes itself, so that finished
   * generations hold no memory until they are collected. A session resumed
   * from a snapshot holds only its last ids, so it keeps its slot.
   */
  park(): void {
    if (!this.#wholeHistory) return;
    this.#parkWhenIdle = true;
    // After the calls already made, which use the slot.
    this.#queue = this.#queue.then(() => this.#parkIfIdle());
  }

  /**
   * Logits after the last consumed id [vocab], as {@link prefill} and
   * {@link step} return them; null before any id, and after a decoding call,
   * which leaves them on the backend (read them with {@link logits}).
   */
  get lastLogits(): Float32Array | null {
    return this.#lastLogits;
  }

  /** Logits after the last consumed id [vocab], read from the backend if need be; null before any id. */
  logits(): Promise<Float32Array | null> {
    return this.#enqueue(() => this.#readLogits());
  }

  /** Feeds a sequence of ids; returns the logits after the last one [vocab]. */
  // deno-lint-ignore require-await -- async so that invalid ids reject instead of throwing.
  async prefill(ids: readonly number[] | Int32Array): Promise<Float32Array> {
    const array = this.#model.tokenIds(ids);
    if (array.length === 0) throw new RangeError("Cannot prefill an empty sequence of ids");
    return this.#enqueue(async () => {
      await this.#feed(array);
      return (await this.#readLogits())!;
    });
  }

  /** Feeds one id; returns the logits after it [vocab]. */
  step(id: number): Promise<Float32Array> {
    return this.prefill([id]);
  }

  /**
   * Feeds `ids[i]` to `sessions[i]`, for sessions of one model, in one batched
   * step: the projections read each weight once for all of them, which is
   * where a decode step spends its time. Returns each session's logits
   * [vocab]. Each session still runs its calls in order.
   */
  static stepTogether(
    sessions: readonly Session<unknown>[],
    ids: readonly number[],
  ): Promise<Float32Array[]> {
    if (sessions.length !== ids.length) {
      return Promise.reject(new RangeError(`${sessions.length} sessions but ${ids.length} ids`));
    }
    if (sessions.some((session) => session.#model !== sessions[0].#model)) {
      return Promise.reject(new RangeError("Sessions stepped together must share one model"));
    }
    if (new Set(sessions).size !== sessions.length) {
      return Promise.reject(new RangeError("A session can take only one step at a time"));
    }
    // Each step goes to the engine in this turn, so they share one batch.
    return Promise.all(sessions.map((session, i) => session.step(ids[i])));
  }

  /**
   * Feeds up to `count` greedy ids, each the argmax (lowest id on ties) over
   * ids below `limit` of the logits so far, with `Sampler.sample`'s
   * repetition penalty when given, and returns them. It stops before an id
   * for which `stopBefore` is true: that id is not fed, and `stopped` says
   * so. The ids are chosen on the backend, read back once per decode round.
   * Needs logits: prefill first.
   */
  greedy(
    count: number,
    options: DecodeOptions & { repetitionPenalty?: number; repeatLastN?: number } = {},
  ): Promise<{ ids: number[]; stopped: boolean }> {
    let sampler: Sampler;
    try {
      const { repetitionPenalty, repeatLastN } = options;
      sampler = new Sampler({ temperature: 0, repetitionPenalty, repeatLastN, seed: 0 });
    } catch (error) {
      return Promise.reject(error);
    }
    return this.sample(count, sampler, options);
  }

  /**
   * Feeds up to `count` ids drawn by `sampler`, like {@link greedy}: it
   * stops before an id for which `stopBefore` is true. The ids are drawn on
   * the backend with the random numbers the sampler would have drawn, and
   * the sampler ends as if it had drawn each id itself. Needs logits.
   */
  sample(
    count: number,
    sampler: Sampler,
    options: DecodeOptions = {},
  ): Promise<{ ids: number[]; stopped: boolean }> {
    const { stopBefore, limit, onIds } = options;
    return this.decode({
      sampler,
      maxTokens: count,
      limit,
      onIds,
      judge: stopBefore && ((id) => stopBefore(id) ? "stop-before" : "continue"),
    });
  }

  /**
   * Feeds `prompt` (if any), then up to `maxTokens` ids picked by `sampler`,
   * each judged by `judge`; returns the ids kept and whether `judge` ended
   * the call. Every kept id is fed, so the session continues after the last
   * one. Runs on the model's decode engine with every other decoding
   * sequence of the model.
   */
  decode(options: SessionDecodeOptions): Promise<{ ids: number[]; stopped: boolean }> {
    const { sampler, maxTokens, judge, onIds } = options;
    let prompt: Int32Array;
    try {
      if (!Number.isInteger(maxTokens) || maxTokens < 0) {
        throw new RangeError(`count must be a non-negative integer, got ${maxTokens}`);
      }
      prompt = this.#model.tokenIds(options.prompt ?? []);
    } catch (error) {
      return Promise.reject(error);
    }
    const limit = Math.min(options.limit ?? Infinity, this.#model.config.vocabSize);
    return this.#enqueue(async () => {
      if (maxTokens === 0) {
        await this.#feed(prompt);
        return { ids: [], stopped: false };
      }
      if (prompt.length === 0 && !this.#hasLogits) {
        throw new RangeError("Decoding needs logits: prefill the session first");
      }
      const history = this.#tokens;
      const result = await engineFor(this.#model).decode({
        slot: this.#slot,
        history,
        prompt,
        options: sampler.options,
        sampler,
        limit,
        maxTokens,
        judge: judge ?? (() => "continue"),
        onIds: onIds ?? (() => {}),
      });
      this.#tokens = [...history, ...prompt, ...result.ids];
      this.#hasLogits = true;
      this.#lastLogits = null;
      return result;
    });
  }

  /** The whole session as bytes; pass it to `model.session(snapshot)` to resume. */
  snapshot(): Promise<Uint8Array> {
    return this.#enqueue(async () => {
      const { nLayer, dConv, dInner, dState, vocabSize } = this.#model.config;
      const contents = await this.#model.pool.read(this.#slot);
      const logitsBytes = this.#hasLogits ? vocabSize * 4 : 0;
      const convLength = (dConv - 1) * convChannels(this.#model.config);
      const stateBytes = nLayer * (convLength + dInner * dState) * 4;
      const kept = this.#tokens.slice(-SNAPSHOT_IDS);
      const bytes = new Uint8Array(
        HEADER_BYTES + kept.length * 4 + logitsBytes + stateBytes + CHECKSUM_BYTES,
      );
      const view = new DataView(bytes.buffer);
      bytes.set(new TextEncoder().encode(MAGIC));
      const fields = [
        nLayer,
        dConv,
        dInner,
        dState,
        vocabSize,
        this.#model.identity,
        kept.length,
        this.#hasLogits ? 1 : 0,
      ];
      fields.forEach((v, i) => view.setUint32(8 + 4 * i, v, true));
      let offset = HEADER_BYTES;
      for (const id of kept) {
        view.setInt32(offset, id, true);
        offset += 4;
      }
      // Snapshots store floats little-endian, as the host does (the project
      // assumes one, see safetensors.ts): their bytes copy as they are.
      const putFloats = (values: Float32Array) => {
        bytes.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), offset);
        offset += values.byteLength;
      };
      if (this.#hasLogits) putFloats(contents.logits);
      for (let l = 0; l < nLayer; l++) {
        putFloats(contents.conv[l]);
        putFloats(contents.ssm[l]);
      }
      view.setUint32(offset, crc32(bytes.subarray(0, offset)), true);
      return bytes;
    });
  }

  /** Gives the session's slot back to the pool; the session must not be used afterwards. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    slotsLeft.unregister(this);
    const release = () => {
      if (this.#slotState !== "given up") this.#model.pool.release(this.#slot);
    };
    // At once when idle, so that a session made next can take the slot.
    if (this.#calls === 0 && this.#pending === null) return release();
    // Else after the calls already made: the engine may still be using the slot.
    this.#queue.then(() => this.#pending?.catch(() => {})).finally(release);
  }

  /** A slot of the pool for this session, given back to it if the session is collected first. */
  #acquire(): number {
    const pool = this.#model.pool;
    const slot = pool.acquire();
    slotsLeft.register(this, { pool: pool as StatePool<unknown>, slot }, this);
    return slot;
  }

  #parkIfIdle(): void {
    if (!this.#parkWhenIdle || this.#disposed || this.#slotState !== "held") return;
    this.#model.pool.park(this.#slot, () => this.#giveUp());
    this.#slotState = "parked";
  }

  /** Called by the pool when it takes a parked slot back. */
  #giveUp(): void {
    slotsLeft.unregister(this);
    this.#slotState = "given up";
    this.#slot = -1;
  }

  /** Before any call: keeps the slot while it runs, or takes a new one and feeds the ids again. */
  async #unpark(): Promise<void> {
    if (this.#slotState === "parked") this.#model.pool.unpark(this.#slot);
    if (this.#slotState !== "given up") {
      this.#slotState = "held";
      return;
    }
    this.#slot = this.#acquire();
    this.#slotState = "held";
    if (this.#tokens.length > 0) {
      await engineFor(this.#model).feed(this.#slot, Int32Array.from(this.#tokens));
    }
  }

  /** Feeds ids through the engine; the logits stay on the backend. */
  async #feed(ids: Int32Array): Promise<void> {
    if (ids.length === 0) return;
    await engineFor(this.#model).feed(this.#slot, ids);
    for (const id of ids) this.#tokens.push(id);
    this.#hasLogits = true;
    this.#lastLogits = null;
  }

  async #readLogits(): Promise<Float32Array | null> {
    if (!this.#hasLogits) return null;
    if (this.#lastLogits === null) {
      const vocab = this.#model.config.vocabSize;
      this.#lastLogits = await this.#model.backend.read(
        this.#model.pool.logits,
        this.#slot * vocab,
        vocab,
      );
    }
    return this.#lastLogits;
  }

  #enqueue<T>(task: () => Promise<T>): Promise<T> {
    this.#calls++;
    const result = this.#queue.then(async () => {
      try {
        if (this.#pending) await this.#pending; // A snapshot that failed says why first.
        if (this.#disposed) throw new Error("The session was disposed");
        await this.#unpark();
        return await task();
      } finally {
        // Before the caller resumes, so that a dispose right after the await finds the session idle.
        if (--this.#calls === 0) this.#parkIfIdle();
      }
    });
    this.#queue = result.catch(() => {});
    return result;
  }

  #restore(data: SnapshotData): void {
    const vocab = this.#model.config.vocabSize;
    this.#model.pool.write(this.#slot, {
      conv: data.conv,
      ssm: data.ssm,
      logits: data.logits ?? new Float32Array(vocab),
    });
    this.#tokens = data.tokens;
    this.#hasLogits = data.logits !== null;
    this.#lastLogits = data.logits;
  }
}

function isPromiseLike(value: unknown): value is PromiseLike<SnapshotBytes> {
  return typeof (value as { then?: unknown } | null)?.then === "function";
}

/** The snapshot's bytes as a Uint8Array (no copy), or a SnapshotError for anything else. */
function asBytes(value: unknown): Uint8Array {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer || value instanceof SharedArrayBuffer) {
    return new Uint8Array(value);
  }
  if (ArrayBuffer.isView(value)) {
    return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  }
  const kind = value === null
    ? "null"
    : typeof value === "object"
    ? (value.constructor?.name ?? "an object")
    : typeof value;
  throw new SnapshotError(`expected bytes (a Uint8Array, an ArrayBuffer or a view), got ${kind}`);
}

function decodeSnapshot<Buf>(bytes: Uint8Array, model: MambaModel<Buf>): SnapshotData {
  if (bytes.length < HEADER_BYTES || new TextDecoder().decode(bytes.subarray(0, 8)) !== MAGIC) {
    const old = bytes.length >= 8 && new TextDecoder().decode(bytes.subarray(0, 8)) === "MAMBASS1";
    throw new SnapshotError(
      old
        ? "it was made by an earlier version of the library (MAMBASS1), which this one cannot check"
        : `it does not start with the ${MAGIC} header`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const field = (i: number) => view.getUint32(8 + 4 * i, true);
  const { nLayer, dConv, dInner, dState, vocabSize } = model.config;
  const expected = { nLayer, dConv, dInner, dState, vocabSize };
  Object.entries(expected).forEach(([name, value], i) => {
    if (field(i) !== value) {
      throw new SnapshotError(
        `it was made for a model with ${name} ${field(i)}, this one has ${value}`,
      );
    }
  });
  const tokenCount = field(6);
  const hasLogits = field(7);
  if (hasLogits > 1) throw new SnapshotError("the logits flag is neither 0 nor 1");
  const convLength = (dConv - 1) * convChannels(model.config);
  const ssmLength = dInner * dState;
  const length = HEADER_BYTES + CHECKSUM_BYTES +
    4 * (tokenCount + hasLogits * vocabSize + nLayer * (convLength + ssmLength));
  if (bytes.length !== length) {
    throw new SnapshotError(`it holds ${bytes.length} bytes, its header implies ${length}`);
  }
  const stored = view.getUint32(length - CHECKSUM_BYTES, true);
  if (crc32(bytes.subarray(0, length - CHECKSUM_BYTES)) !== stored) {
    throw new SnapshotError("its checksum does not match: the bytes were damaged");
  }
  if (field(5) !== model.identity) {
    throw new SnapshotError(
      "it was made for another model of the same sizes (its weights differ)",
    );
  }
  let offset = HEADER_BYTES;
  const tokens: number[] = [];
  for (let i = 0; i < tokenCount; i++, offset += 4) {
    const id = view.getInt32(offset, true);
    if (id < 0 || id >= vocabSize) {
      throw new SnapshotError(`token ${i} has id ${id}, outside the vocabulary`);
    }
    tokens.push(id);
  }
  // Little-endian floats, copied so that they are aligned whatever the offset.
  // A model's logits and states are finite: anything else was damaged or forged.
  const floats = (count: number, what: string) => {
    const values = new Float32Array(bytes.slice(offset, offset + count * 4).buffer);
    offset += count * 4;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v - v !== 0) {
        throw new SnapshotError(
          `${what} ${what === "the logits" ? "hold" : "holds"} ${v} at index ${i}`,
        );
      }
    }
    return values;
  };
  const logits = hasLogits ? floats(vocabSize, "the logits") : null;
  const conv: Float32Array[] = [];
  const ssm: Float32Array[] = [];
  for (let l = 0; l < nLayer; l++) {
    conv.push(floats(convLength, `layer ${l}'s convolution state`));
    ssm.push(floats(ssmLength, `layer ${l}'s SSM state`));
  }
  return { tokens, logits, conv, ssm };
}
