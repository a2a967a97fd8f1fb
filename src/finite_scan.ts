/**
 * The finiteness check of weights at load, hidden behind the reads: while a
 * weight file is read piece by piece, each piece that has landed is scanned
 * (the file source starts the next read first, so the scan runs while the
 * operating system copies the next piece), and every 64 KiB block that holds
 * a NaN or Infinity bit pattern is flagged. The loader's exact pass (which
 * names the tensor and the index) then only runs on tensors that touch a
 * flagged or unscanned block.
 *
 * A file read into memory that the scan lends ({@link FiniteScan.bytes}, a
 * WebAssembly memory of its own) is scanned by a small SIMD function, 16
 * bytes at a time: a pass in JavaScript is slower than the read it should
 * hide. Memory lent by someone else (the wasm backend's, see
 * `Backend.hostBytes`) gets the same test in JavaScript.
 *
 * Flags live as long as one {@link FiniteScan}, which the loader makes for
 * one load.
 *
 * @module
 */

/** Bytes of the memory that one flag covers. */
export const SCAN_BLOCK_BYTES = 64 << 10;

/** A block's state: not (yet) scanned, scanned with every word finite, or holding NaN or ±Infinity. */
const UNSCANNED = 0, FINITE = 1, NOT_FINITE = 2;

/** Bytes of a WebAssembly page; a memory holds at most 65,536 of them. */
const PAGE_BYTES = 1 << 16;
const MAX_PAGES = 1 << 16;

/**
 * The scan as WebAssembly, assembled here (it is 150 bytes, not worth a build
 * step). In the text format:
 *
 * ```wat
 * (module
 *   (import "env" "memory" (memory 0))
 *   ;; Nonzero when a 4-byte word in [p, end) has an exponent of all ones (NaN,
 *   ;; ±Infinity): exponent plus 2^23 then carries into the sign bit. end − p is
 *   ;; a multiple of 16.
 *   (func (export "nonFinite") (param $p i32) (param $end i32) (result i32)
 *     (local $carries v128)
 *     (block $done
 *       (loop $next
 *         (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
 *         (local.set $carries (v128.or (local.get $carries)
 *           (i32x4.add (v128.and (v128.load (local.get $p)) (v128.const i32x4 0x7f800000 …))
 *                      (v128.const i32x4 0x00800000 …))))
 *         (local.set $p (i32.add (local.get $p) (i32.const 16)))
 *         (br $next)))
 *     (i32x4.bitmask (local.get $carries))))
 * ```
 */
function scanModuleBytes(): Uint8Array<ArrayBuffer> {
  const leb = (n: number): number[] => {
    const out: number[] = [];
    do {
      out.push((n & 0x7f) | (n >= 0x80 ? 0x80 : 0));
      n >>>= 7;
    } while (n > 0);
    return out;
  };
  const name = (text: string) => [text.length, ...new TextEncoder().encode(text)];
  const section = (id: number, content: number[]) => [id, ...leb(content.length), ...content];
  const i32x4 = (word: number) =>
    [...Array(4)].flatMap(() => [0, 1, 2, 3].map((b) => (word >>> (8 * b)) & 0xff));
  const SIMD = 0xfd;
  const body = [
    1,
    1,
    0x7b, // one local: v128
    0x02,
    0x40,
    0x03,
    0x40, // block, loop
    0x20,
    0,
    0x20,
    1,
    0x4f,
    0x0d,
    1, // br_if $done (p >= end)
    0x20,
    2,
    0x20,
    0,
    SIMD,
    0x00,
    4,
    0, // carries, v128.load p
    SIMD,
    0x0c,
    ...i32x4(0x7f800000),
    SIMD,
    0x4e, // v128.and with the exponent mask
    SIMD,
    0x0c,
    ...i32x4(0x00800000),
    SIMD,
    ...leb(0xae), // i32x4.add 2^23
    SIMD,
    0x50,
    0x21,
    2, // v128.or into carries
    0x20,
    0,
    0x41,
    16,
    0x6a,
    0x21,
    0,
    0x0c,
    0, // p += 16, br $next
    0x0b,
    0x0b, // end loop, end block
    0x20,
    2,
    SIMD,
    ...leb(0xa4),
    0x0b, // i32x4.bitmask carries
  ];
  return new Uint8Array([
    0x00,
    0x61,
    0x73,
    0x6d,
    1,
    0,
    0,
    0,
    ...section(1, [1, 0x60, 2, 0x7f, 0x7f, 1, 0x7f]),
    ...section(2, [1, ...name("env"), ...name("memory"), 2, 0, 0]),
    ...section(3, [1, 0]),
    ...section(7, [1, ...name("nonFinite"), 0, 0]),
    ...section(10, [1, ...leb(body.length), ...body]),
  ]);
}

/** `nonFinite` of a scan module bound to a memory, or null where WebAssembly SIMD is missing. */
function instantiateScan(memory: WebAssembly.Memory): ((p: number, end: number) => number) | null {
  try {
    const module = new WebAssembly.Module(scanModuleBytes());
    const instance = new WebAssembly.Instance(module, { env: { memory } });
    return instance.exports.nonFinite as (p: number, end: number) => number;
  } catch {
    return null;
  }
}

/** The same test in JavaScript over the 4-byte words [from, to) of `words`: negative when one is not finite. */
function carriesOf(words: Int32Array, from: number, to: number): number {
  let carries = 0;
  for (let i = from; i < to; i++) carries |= ((words[i] & 0x7f800000) + 0x00800000) | 0;
  return carries;
}

/** The bytes of one read, with a flag per block. */
interface Region {
  readonly bytes: Uint8Array;
  /** One state per block, from the region's first byte. */
  readonly flags: Uint8Array;
  /** Bytes reported filled so far; a smaller count means the bytes are being written anew. */
  filled: number;
  /** Bytes scanned so far: whole blocks, then the tail. */
  scanned: number;
}

/**
 * Scans weight bytes for NaN and Infinity as they are read, and vouches for
 * tensors whose blocks all came back finite.
 */
export class FiniteScan {
  #regions: Region[] = [];
  /** The memories {@link bytes} lent, each with its scan function. */
  #memories = new Map<ArrayBufferLike, (p: number, end: number) => number>();

  /**
   * A zeroed array of `byteLength` bytes for a file to be read into: in a
   * WebAssembly memory of its own, which the SIMD scan reads, where one can
   * hold it (up to 4 GiB); else a plain array, scanned in JavaScript.
   */
  bytes(byteLength: number): Uint8Array {
    const pages = Math.ceil(byteLength / PAGE_BYTES);
    if (pages > 0 && pages <= MAX_PAGES) {
      try {
        const memory = new WebAssembly.Memory({ initial: pages });
        const nonFinite = instantiateScan(memory);
        if (nonFinite) {
          this.#memories.set(memory.buffer, nonFinite);
          return new Uint8Array(memory.buffer, 0, byteLength);
        }
      } catch {
        // No memory that large here: a plain array below.
      }
    }
    return new Uint8Array(byteLength);
  }

  /**
   * Tells the scan that the first `filled` bytes of `bytes` hold their final
   * values; the blocks that became whole (and the tail, once the array is
   * full) are scanned now. A count not above the last one for the same array
   * starts over: the bytes are being rewritten, and flags of any earlier read
   * of this memory are dropped. Arrays not 4-byte aligned in their buffer are
   * not scanned.
   */
  observe(bytes: Uint8Array, filled: number): void {
    if (bytes.byteOffset % 4) return;
    let region = this.#regions.find((r) => r.bytes === bytes);
    if (!region || filled <= region.filled) region = this.#watch(bytes);
    region.filled = filled;
    const upTo = filled >= bytes.length ? bytes.length : filled - filled % SCAN_BLOCK_BYTES;
    for (; region.scanned < upTo; region.scanned += SCAN_BLOCK_BYTES) {
      const start = region.scanned, end = Math.min(upTo, start + SCAN_BLOCK_BYTES);
      region.flags[start / SCAN_BLOCK_BYTES] = this.#blockIsFinite(bytes, start, end)
        ? FINITE
        : NOT_FINITE;
    }
    region.scanned = Math.min(region.scanned, upTo);
  }

  /** Whether bytes [start, end) of `bytes` (start 4-byte aligned) hold only finite 4-byte words. */
  #blockIsFinite(bytes: Uint8Array, start: number, end: number): boolean {
    const from = bytes.byteOffset + start;
    const words = (end - start) >>> 2;
    const nonFinite = this.#memories.get(bytes.buffer);
    // The SIMD function takes whole 16-byte steps; the last few words go to JavaScript.
    const simdBytes = nonFinite ? (words >>> 2) << 4 : 0;
    if (simdBytes && nonFinite!(from, from + simdBytes) !== 0) return false;
    const view = new Int32Array(bytes.buffer, from + simdBytes, words - (simdBytes >>> 2));
    return carriesOf(view, 0, view.length) >= 0;
  }

  /** A new region for `bytes`, replacing every region that shares memory with it. */
  #watch(bytes: Uint8Array): Region {
    const start = bytes.byteOffset, end = start + bytes.byteLength;
    this.#regions = this.#regions.filter(({ bytes: other }) =>
      other.buffer !== bytes.buffer || other.byteOffset >= end ||
      other.byteOffset + other.byteLength <= start
    );
    const flags = new Uint8Array(Math.ceil(bytes.byteLength / SCAN_BLOCK_BYTES)).fill(UNSCANNED);
    const region: Region = { bytes, flags, filled: 0, scanned: 0 };
    this.#regions.push(region);
    return region;
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
}
