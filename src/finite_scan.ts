/**
 * The finiteness check of weights at load, moved off the main thread: while
 * a weight file is read into shared memory, a worker scans each piece that
 * has landed and flags every 64 KiB block that holds a NaN or Infinity bit
 * pattern, so that the main thread's exact pass (which names the tensor and
 * the index) only runs on tensors that touch a flagged or unscanned block.
 *
 * Flags live as long as one {@link FiniteScan}, which the loader starts for
 * one load and closes after it. Where no worker can start (no `Worker`, no
 * `SharedArrayBuffer`, a refused blob URL), or the worker fails, nothing is
 * vouched for and every tensor gets the exact pass.
 *
 * @module
 */

/** Bytes of the memory that one flag covers. */
export const SCAN_BLOCK_BYTES = 64 << 10;

/**
 * Bytes that go to the worker together at least (the rest of a file at its
 * end): a download lands in chunks of some KiB, each worth no message.
 */
const POST_MIN_BYTES = 4 << 20;

/** A block's state: not (yet) scanned, scanned with every word finite, or holding NaN or ±Infinity. */
const UNSCANNED = 0, FINITE = 1, NOT_FINITE = 2;

/**
 * The worker: for a range of a SharedArrayBuffer (4-byte aligned), one flag
 * per 64 KiB block, from the OR of each 4-byte word's exponent plus 2^23
 * (an exponent of all ones carries into the sign bit).
 */
const WORKER_SOURCE = `
self.onmessage = ({ data: { id, buffer, byteOffset, byteLength, firstBlock } }) => {
  const words = new Int32Array(buffer, byteOffset, byteLength >>> 2);
  const blockWords = ${SCAN_BLOCK_BYTES / 4};
  const flags = new Uint8Array(Math.ceil(byteLength / ${SCAN_BLOCK_BYTES}));
  for (let b = 0; b < flags.length; b++) {
    const end = Math.min(words.length, (b + 1) * blockWords);
    let carries = 0;
    for (let i = b * blockWords; i < end; i++) carries |= ((words[i] & 0x7f800000) + 0x00800000) | 0;
    flags[b] = carries < 0 ? ${NOT_FINITE} : ${FINITE};
  }
  self.postMessage({ id, firstBlock, flags }, [flags.buffer]);
};
`;

/** The bytes of one read: a range of a shared buffer, with a flag per block. */
interface Region {
  readonly id: number;
  readonly bytes: Uint8Array;
  /** One state per block, from the region's first byte. */
  readonly flags: Uint8Array;
  /** Bytes reported filled so far; a smaller count means the bytes are being written anew. */
  filled: number;
  /** Bytes handed to the worker so far: whole blocks, then the tail. */
  posted: number;
}

/**
 * Scans weight bytes for NaN and Infinity on a worker thread as they are
 * read, and vouches for tensors whose blocks all came back finite.
 */
export class FiniteScan {
  #worker: Worker | null;
  /** The worker's blob URL, kept until it stops: the worker may load it after the constructor returns. */
  readonly #url: string;
  #regions: Region[] = [];
  #nextId = 0;
  #pending = 0;
  #whenIdle: (() => void)[] = [];

  private constructor(worker: Worker, url: string) {
    this.#worker = worker;
    this.#url = url;
    worker.onmessage = (
      { data }: MessageEvent<{ id: number; firstBlock: number; flags: Uint8Array }>,
    ) => {
      if (!this.#worker) return; // Answers that were under way when it stopped.
      this.#regions.find((region) => region.id === data.id)?.flags.set(data.flags, data.firstBlock);
      this.#settle(-1);
    };
    worker.onerror = (event) => {
      event.preventDefault();
      this.close();
    };
    worker.onmessageerror = () => this.close();
  }

  /** Starts the worker; null where this runtime cannot run one on shared memory. */
  static start(): FiniteScan | null {
    if (typeof Worker === "undefined" || typeof SharedArrayBuffer === "undefined") return null;
    let url: string | undefined;
    try {
      url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
      return new FiniteScan(new Worker(url, { type: "module" }), url);
    } catch {
      if (url) URL.revokeObjectURL(url);
      return null;
    }
  }

  /** A zeroed array of `byteLength` bytes over a new SharedArrayBuffer, for a file to be read into. */
  sharedBytes(byteLength: number): Uint8Array {
    return new Uint8Array(new SharedArrayBuffer(byteLength));
  }

  /**
   * Tells the scan that the first `filled` bytes of `bytes` hold their final
   * values; the blocks that became whole go to the worker (a few MiB at a time). A count not above
   * the last one for the same array starts over: the bytes are being
   * rewritten, and flags of any earlier read of this memory are dropped.
   * Arrays not over a SharedArrayBuffer, or not 4-byte aligned in it, are
   * not scanned.
   */
  observe(bytes: Uint8Array, filled: number): void {
    if (!this.#worker || !(bytes.buffer instanceof SharedArrayBuffer) || bytes.byteOffset % 4) {
      return;
    }
    let region = this.#regions.find((r) => r.bytes === bytes);
    if (!region || filled <= region.filled) region = this.#watch(bytes);
    region.filled = filled;
    const upTo = filled >= bytes.length ? bytes.length : filled - filled % SCAN_BLOCK_BYTES;
    if (upTo <= region.posted || (upTo < bytes.length && upTo - region.posted < POST_MIN_BYTES)) {
      return;
    }
    this.#worker.postMessage({
      id: region.id,
      buffer: bytes.buffer,
      byteOffset: bytes.byteOffset + region.posted,
      byteLength: upTo - region.posted,
      firstBlock: region.posted / SCAN_BLOCK_BYTES,
    });
    region.posted = upTo;
    this.#settle(1);
  }

  /** A new region for `bytes`, replacing every region that shares memory with it. */
  #watch(bytes: Uint8Array): Region {
    const start = bytes.byteOffset, end = start + bytes.byteLength;
    this.#regions = this.#regions.filter(({ bytes: other }) =>
      other.buffer !== bytes.buffer || other.byteOffset >= end ||
      other.byteOffset + other.byteLength <= start
    );
    const flags = new Uint8Array(Math.ceil(bytes.byteLength / SCAN_BLOCK_BYTES)).fill(UNSCANNED);
    const region: Region = { id: this.#nextId++, bytes, flags, filled: 0, posted: 0 };
    this.#regions.push(region);
    return region;
  }

  /** Resolves once the worker has answered for every block handed to it (or has failed). */
  settled(): Promise<void> {
    if (this.#pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.#whenIdle.push(resolve));
  }

  #settle(change: number): void {
    this.#pending += change;
    if (this.#pending > 0) return;
    for (const resolve of this.#whenIdle.splice(0)) resolve();
  }

  /**
   * Whether `values` lie in bytes read to their end, and every block they
   * touch was scanned and holds only finite values.
   */
  vouches(values: Float32Array): boolean {
    const start = values.byteOffset, end = start + values.byteLength;
    const region = this.#regions.find(({ bytes }) =>
      bytes.buffer === values.buffer && bytes.byteOffset <= start &&
      end <= bytes.byteOffset + bytes.byteLength
    );
    // A read that did not finish may have left its memory to other writes.
    if (!region || region.filled < region.bytes.length || values.length === 0) return false;
    const first = Math.floor((start - region.bytes.byteOffset) / SCAN_BLOCK_BYTES);
    const last = Math.floor((end - 1 - region.bytes.byteOffset) / SCAN_BLOCK_BYTES);
    for (let block = first; block <= last; block++) {
      if (region.flags[block] !== FINITE) return false;
    }
    return true;
  }

  /** Stops the worker and forgets every flag; {@link vouches} is false from now on. */
  close(): void {
    this.#worker?.terminate();
    this.#worker = null;
    URL.revokeObjectURL(this.#url);
    this.#regions = [];
    this.#pending = 0;
    this.#settle(0);
  }
}
