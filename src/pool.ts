/**
 * {@link StatePool}: the recurrent state of every sequence a model runs, kept
 * on the backend in one buffer per layer and kind, a row per sequence (a
 * slot). Kernels take slot numbers (ggml's `ssm_scan` with `ids` is the
 * precedent), so a batch of sequences steps together with nothing gathered
 * or scattered, and a sequence's state moves to or from the host in one
 * staged transfer.
 *
 * A slot holds, per layer, the conv state [dConv - 1, dInner] and the SSM
 * state [dInner, N] (Mamba-2: [dConv - 1, dInner + 2·G·N] and [H, P, N]); then the logits after the sequence's last id [vocab],
 * and the id the decode engine feeds it next.
 *
 * @module
 */

import type { Backend } from "./backend.ts";
import { convChannels, type MambaConfig } from "./config.ts";

/** One slot's contents on the host. */
export interface SlotContents {
  /** Per layer, the conv state [dConv - 1, dInner]. */
  conv: Float32Array[];
  /** Per layer, the SSM state h [dInner, N]. */
  ssm: Float32Array[];
  /** Logits after the last id [vocab]. */
  logits: Float32Array;
}

/** Buffers shaped as a pool's, holding a copy of some of its rows (see {@link StatePool.save}). */
export interface PoolCopy<Buf> {
  /** Per layer, a copy of {@link StatePool.conv}'s rows. */
  conv: Buf[];
  /** Per layer, a copy of {@link StatePool.ssm}'s rows. */
  ssm: Buf[];
  /** A copy of {@link StatePool.logits}' rows. */
  logits: Buf;
  /** A copy of {@link StatePool.next}'s rows. */
  next: Buf;
  /** Slots it has room for. */
  capacity: number;
}

/** Slots a new pool holds; it doubles when full. */
const INITIAL_SLOTS = 4;

/** The states of every sequence of a model, a slot each, on its backend. */
export class StatePool<Buf> {
  /** Per layer, conv states [capacity, dConv - 1, dInner]. */
  conv: Buf[] = [];
  /** Per layer, SSM states [capacity, dInner, N]. */
  ssm: Buf[] = [];
  /** Logits after each slot's last id [capacity, vocab]. */
  logits: Buf;
  /** The id each decoding slot feeds next [capacity], as floats (the decode engine's). */
  next: Buf;
  /** Bumped whenever the buffers are replaced (when the pool grows). */
  version = 0;

  readonly #be: Backend<Buf>;
  readonly #convLength: number;
  readonly #ssmLength: number;
  readonly #vocab: number;
  readonly #layers: number;
  #capacity = 0;
  /** Free slots; the lowest is handed out first, so the used ones stay dense. */
  readonly #free = new Set<number>();
  /**
   * No slot below this one is free: where {@link acquire} starts its search,
   * so that a burst of N new sequences costs O(N) in all, not O(N · capacity).
   */
  #noFreeBelow = 0;
  /** Parked slots (see {@link park}), oldest first, with what gives each up. */
  readonly #parked = new Map<number, () => void>();
  /** Zeros as long as the longest row: copied over a lone slot, or scattered over several, to zero them. */
  readonly #zeros: Buf;
  /** Slots acquired since the last {@link zeroAcquired}: their rows still hold earlier sequences' states. */
  readonly #unzeroed = new Set<number>();
  /** [capacity] zeros: the source row (row 0 of {@link #zeros}) of every slot that {@link zeroAcquired} zeroes. */
  #zeroRows: Buf;
  /** [capacity] the slots {@link zeroAcquired} zeroes, as floats. */
  #unzeroedRows: Buf;

  /** An empty pool for a model of `config` on `backend`. */
  constructor(backend: Backend<Buf>, config: MambaConfig) {
    this.#be = backend;
    const { nLayer, dConv, dInner, dState, vocabSize } = config;
    this.#layers = nLayer;
    this.#convLength = (dConv - 1) * convChannels(config);
    this.#ssmLength = dInner * dState;
    this.#vocab = vocabSize;
    this.#zeros = backend.zeros(Math.max(this.#convLength, this.#ssmLength, vocabSize, 1));
    this.logits = backend.zeros(0);
    this.next = backend.zeros(0);
    this.#zeroRows = backend.zeros(0);
    this.#unzeroedRows = backend.zeros(0);
    this.#grow(INITIAL_SLOTS);
  }

  /** Slots held now, used or free. */
  get capacity(): number {
    return this.#capacity;
  }

  /** Slots in use. */
  get used(): number {
    return this.#capacity - this.#free.size;
  }

  /** One more than the highest slot in use (0 when none is): rows [0, end) hold every used slot. */
  get end(): number {
    for (let slot = this.#capacity - 1; slot >= 0; slot--) {
      if (!this.#free.has(slot)) return slot + 1;
    }
    return 0;
  }

  /** Floats of one slot's state, logits included. */
  get slotFloats(): number {
    return this.#layers * (this.#convLength + this.#ssmLength) + this.#vocab;
  }

  /**
   * A slot for the start of a sequence: zero state, zero logits, once
   * {@link zeroAcquired} has run (whatever reads or writes the pool's rows
   * calls it first). When no slot is free the oldest parked one is taken
   * back, and only without one does the pool grow.
   */
  acquire(): number {
    if (this.#free.size === 0) {
      const oldest = this.#parked.entries().next();
      if (oldest.done) this.#grow(this.#capacity * 2);
      else {
        const [parked, giveUp] = oldest.value;
        this.#parked.delete(parked);
        giveUp();
        this.#free.add(parked);
        this.#noFreeBelow = Math.min(this.#noFreeBelow, parked);
      }
    }
    let slot = this.#noFreeBelow;
    while (!this.#free.has(slot)) slot++;
    this.#free.delete(slot);
    this.#noFreeBelow = slot + 1;
    this.#unzeroed.add(slot);
    return slot;
  }

  /**
   * Zeroes the state and logits of every slot acquired since the last call:
   * for one slot a copy of zeros per buffer, for several one scatter of a
   * zero row per buffer. Acquiring only marks a slot, so that a burst of new
   * sequences (256 concurrent `generate` calls, an edge server's requests)
   * costs a launch per buffer rather than a copy per buffer and sequence,
   * which on a GPU took longer than the burst's prompts; a lone sequence
   * keeps the copies, which cost a GPU less than launches do
   * (docs/performance.md). The decode engine and the model call it before
   * they feed or step; the pool's own reads, writes and copies of rows call
   * it first. Never call it inside a capture: replays would zero slots again.
   */
  zeroAcquired(): void {
    if (this.#unzeroed.size === 0) return;
    const be = this.#be;
    const slots = Float32Array.from(this.#unzeroed);
    this.#unzeroed.clear();
    if (slots.length === 1) {
      this.#forEachRow((buf, length) =>
        be.copy({ dst: buf, dstOffset: slots[0] * length, src: this.#zeros, length })
      );
      return;
    }
    be.write(this.#unzeroedRows, slots);
    this.#forEachRow((buf, length) =>
      be.copyRows({
        dst: buf,
        src: this.#zeros,
        width: length,
        count: slots.length,
        srcRows: { buf: this.#zeroRows, offset: 0 },
        dstRows: { buf: this.#unzeroedRows, offset: 0 },
      })
    );
  }

  /**
   * Grows the pool, as {@link acquire} would, until it holds at least
   * `slots` slots, so that what depends on its buffers (recorded steps)
   * can be made now and stay valid.
   */
  reserve(slots: number): void {
    let capacity = this.#capacity;
    while (capacity < slots) capacity *= 2;
    if (capacity > this.#capacity) this.#grow(capacity);
  }

  /** Gives a slot back for reuse. */
  release(slot: number): void {
    this.#check(slot);
    this.#parked.delete(slot);
    this.#free.add(slot);
    this.#noFreeBelow = Math.min(this.#noFreeBelow, slot);
  }

  /**
   * Marks a slot in use as one its owner can do without for now: when the
   * pool runs out, {@link acquire} calls `giveUp` and hands the slot to a new
   * owner rather than grow. {@link unpark} or {@link release} ends it.
   */
  park(slot: number, giveUp: () => void): void {
    this.#check(slot);
    this.#parked.set(slot, giveUp);
  }

  /** Keeps a parked slot with its owner again (see {@link park}). */
  unpark(slot: number): void {
    this.#parked.delete(slot);
  }

  /** Reads a slot's state and logits to the host: one staged copy, one read. */
  async read(slot: number): Promise<SlotContents> {
    this.#check(slot);
    this.zeroAcquired();
    const be = this.#be;
    const stage = be.zeros(this.slotFloats);
    try {
      let at = 0;
      this.#forEachRow((buf, length) => {
        be.copy({ dst: stage, dstOffset: at, src: buf, srcOffset: slot * length, length });
        at += length;
      });
      const all = await be.read(stage);
      const conv: Float32Array[] = [];
      const ssm: Float32Array[] = [];
      at = 0;
      const take = (length: number) => all.subarray(at, at += length);
      for (let l = 0; l < this.#layers; l++) {
        conv.push(take(this.#convLength));
        ssm.push(take(this.#ssmLength));
      }
      return { conv, ssm, logits: take(this.#vocab) };
    } finally {
      be.release(stage);
    }
  }

  /** Overwrites a slot's state and logits from the host: one write, then copies on the backend. */
  write(slot: number, contents: SlotContents): void {
    this.#check(slot);
    this.zeroAcquired(); // before, not after, the write: zeroing must not undo it
    const be = this.#be;
    const all = new Float32Array(this.slotFloats);
    let at = 0;
    const put = (values: Float32Array, length: number) => {
      if (values.length !== length) {
        throw new RangeError(`A slot's part holds ${length} floats, got ${values.length}`);
      }
      all.set(values, at);
      at += length;
    };
    for (let l = 0; l < this.#layers; l++) {
      put(contents.conv[l], this.#convLength);
      put(contents.ssm[l], this.#ssmLength);
    }
    put(contents.logits, this.#vocab);
    const stage = be.zeros(all.length);
    be.write(stage, all);
    at = 0;
    this.#forEachRow((buf, length) => {
      be.copy({ dst: buf, dstOffset: slot * length, src: stage, srcOffset: at, length });
      at += length;
    });
    be.release(stage);
  }

  /** Buffers for copies of this pool's rows (see {@link save}); give them back with {@link releaseCopy}. */
  createCopy(): PoolCopy<Buf> {
    const be = this.#be;
    const rows = (length: number) => be.zeros(this.#capacity * length);
    return {
      conv: this.conv.map(() => rows(this.#convLength)),
      ssm: this.ssm.map(() => rows(this.#ssmLength)),
      logits: rows(this.#vocab),
      next: rows(1),
      capacity: this.#capacity,
    };
  }

  /** Frees the buffers of a copy. */
  releaseCopy(copy: PoolCopy<Buf>): void {
    for (const buf of [...copy.conv, ...copy.ssm, copy.logits, copy.next]) this.#be.release(buf);
  }

  /** Copies rows [0, rows) of every buffer into `copy`. */
  save(copy: PoolCopy<Buf>, rows: number): void {
    if (rows > copy.capacity) {
      throw new RangeError(`A copy of ${copy.capacity} slots cannot hold ${rows}`);
    }
    this.zeroAcquired();
    const be = this.#be;
    this.#forEachRow((buf, length, i) =>
      be.copy({ dst: this.#rowsOf(copy, i), src: buf, length: rows * length })
    );
    be.copy({ dst: copy.next, src: this.next, length: rows });
  }

  /** Copies slot `slot`'s rows back from `copy`, as {@link save} left them. */
  restore(copy: PoolCopy<Buf>, slot: number): void {
    this.#check(slot);
    if (slot >= copy.capacity) {
      throw new RangeError(`Slot ${slot} is outside a copy of ${copy.capacity}`);
    }
    this.zeroAcquired();
    const be = this.#be;
    this.#forEachRow((buf, length, i) =>
      be.copy({
        dst: buf,
        dstOffset: slot * length,
        src: this.#rowsOf(copy, i),
        srcOffset: slot * length,
        length,
      })
    );
    be.copy({ dst: this.next, dstOffset: slot, src: copy.next, srcOffset: slot, length: 1 });
  }

  /** Frees every buffer; the pool must not be used afterwards. */
  dispose(): void {
    const own = [this.#zeros, this.#zeroRows, this.#unzeroedRows];
    for (const buf of [...this.conv, ...this.ssm, this.logits, this.next, ...own]) {
      this.#be.release(buf);
    }
  }

  /** Buffer i of a copy, in {@link #forEachRow}'s order. */
  #rowsOf(copy: PoolCopy<Buf>, i: number): Buf {
    if (i < 2 * this.#layers) return i % 2 === 0 ? copy.conv[i >> 1] : copy.ssm[i >> 1];
    return copy.logits;
  }

  /** Calls `fn` with each buffer of slot rows and its row length: per layer conv then ssm, then logits. */
  #forEachRow(fn: (buf: Buf, length: number, index: number) => void): void {
    for (let l = 0; l < this.#layers; l++) {
      fn(this.conv[l], this.#convLength, 2 * l);
      fn(this.ssm[l], this.#ssmLength, 2 * l + 1);
    }
    fn(this.logits, this.#vocab, 2 * this.#layers);
  }

  /** Replaces every buffer by one of `capacity` rows, keeping the rows held so far. */
  #grow(capacity: number): void {
    const be = this.#be;
    const old = this.#capacity;
    const regrow = (buf: Buf | undefined, length: number): Buf => {
      const grown = be.zeros(capacity * length);
      if (buf !== undefined) {
        if (old > 0 && length > 0) be.copy({ dst: grown, src: buf, length: old * length });
        be.release(buf);
      }
      return grown;
    };
    this.conv = Array.from(
      { length: this.#layers },
      (_, l) => regrow(this.conv[l], this.#convLength),
    );
    this.ssm = Array.from({ length: this.#layers }, (_, l) => regrow(this.ssm[l], this.#ssmLength));
    this.logits = regrow(this.logits, this.#vocab);
    this.next = regrow(this.next, 1);
    // Slots acquired but not yet zeroed keep their marks: zeroAcquired zeroes them in the new buffers.
    be.release(this.#zeroRows);
    be.release(this.#unzeroedRows);
    this.#zeroRows = be.zeros(capacity);
    this.#unzeroedRows = be.zeros(capacity);
    for (let slot = old; slot < capacity; slot++) this.#free.add(slot);
    this.#capacity = capacity;
    this.version++;
  }

  #check(slot: number): void {
    if (!(Number.isInteger(slot) && slot >= 0 && slot < this.#capacity)) {
      throw new RangeError(`Slot ${slot} is outside the pool's ${this.#capacity} slots`);
    }
  }
}
