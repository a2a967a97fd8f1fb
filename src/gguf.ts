/**
 * A reader for [GGUF](https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
 * llama.cpp's model file format, written from the format's specification.
 *
 * Layout (all little-endian): the magic `GGUF`, a u32 version (2 or 3), u64
 * tensor and metadata counts, the metadata key/value pairs, one info per
 * tensor (name, dimensions innermost first, ggml type, offset), padding to
 * the alignment (`general.alignment`, default 32), then the tensor data,
 * each tensor at its offset from the start of that section.
 *
 * {@linkcode GgufFile.parse} checks every length, count, type, dimension,
 * offset and size against the file before any tensor is read, and reports
 * problems as {@linkcode ModelFileError}s naming the file and the field.
 * {@linkcode GgufFile.float32} widens F32, F16 and BF16 tensors and
 * dequantizes Q8_0, Q4_0, Q4_K and Q6_K ones (Q4_K_M files hold Q6_K
 * matrices too) from their block layouts (as ggml's
 * reference `dequantize_row_*` functions do); other types are a clear error
 * naming the type.
 *
 * @example Write a tiny file, then read its metadata and a tensor
 * ```ts
 * import { GGML, GgufFile } from "./gguf.ts";
 * import { quantize, writeGguf } from "./gguf_write.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const values = new Float32Array([1, 2, 3, 4, 5, 6]);
 * const bytes = writeGguf(
 *   new Map([["general.architecture", { type: "string", value: "mamba" }]]),
 *   [{ name: "w", shape: [2, 3], type: GGML.F16, data: quantize(GGML.F16, values) }],
 * );
 * const gguf = GgufFile.parse(bytes, "tiny.gguf");
 * assertEquals(gguf.metadata.get("general.architecture"), "mamba");
 * assertEquals(gguf.info("w").dims, [3, 2]); // innermost first
 * assertEquals(gguf.float32("w"), values);
 * ```
 *
 * @module
 */

import { ModelFileError } from "./errors.ts";
import { bf16ToF32, f16ToF32 } from "./safetensors.ts";

/** A ggml tensor type: its name, elements per block and bytes per block. */
export interface GgmlType {
  /** ggml's name, e.g. "Q8_0". */
  name: string;
  /** Elements per block (1 for plain types). */
  blockSize: number;
  /** Bytes per block. */
  typeSize: number;
}

/** Every ggml type, by number, so that any file's sizes can be checked; see {@link dequantize} for those read. */
export const GGML_TYPES: ReadonlyMap<number, GgmlType> = new Map(
  ([
    [0, "F32", 1, 4],
    [1, "F16", 1, 2],
    [2, "Q4_0", 32, 18],
    [3, "Q4_1", 32, 20],
    [6, "Q5_0", 32, 22],
    [7, "Q5_1", 32, 24],
    [8, "Q8_0", 32, 34],
    [9, "Q8_1", 32, 40],
    [10, "Q2_K", 256, 84],
    [11, "Q3_K", 256, 110],
    [12, "Q4_K", 256, 144],
    [13, "Q5_K", 256, 176],
    [14, "Q6_K", 256, 210],
    [15, "Q8_K", 256, 292],
    [16, "IQ2_XXS", 256, 66],
    [17, "IQ2_XS", 256, 74],
    [18, "IQ3_XXS", 256, 98],
    [19, "IQ1_S", 256, 50],
    [20, "IQ4_NL", 32, 18],
    [21, "IQ3_S", 256, 110],
    [22, "IQ2_S", 256, 82],
    [23, "IQ4_XS", 256, 136],
    [24, "I8", 1, 1],
    [25, "I16", 1, 2],
    [26, "I32", 1, 4],
    [27, "I64", 1, 8],
    [28, "F64", 1, 8],
    [29, "IQ1_M", 256, 56],
    [30, "BF16", 1, 2],
    [34, "TQ1_0", 256, 54],
    [35, "TQ2_0", 256, 66],
  ] as const).map(([id, name, blockSize, typeSize]) => [id, { name, blockSize, typeSize }]),
);

/** The ggml type numbers this module reads. */
export const GGML = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8, Q4_K: 12, Q6_K: 14, BF16: 30 } as const;

/** A metadata value: numbers (u64/i64 past 2^53 as bigint), booleans, strings, or arrays of them. */
export type GgufValue = number | bigint | boolean | string | GgufValue[];

/** Where one tensor lives in a parsed GGUF file. */
export interface GgufTensorInfo {
  /** The tensor's name. */
  name: string;
  /** The ggml type number (see {@link GGML_TYPES}). */
  type: number;
  /** ggml's dimensions, innermost (contiguous) first. */
  dims: number[];
  /** The same dimensions outermost first, as PyTorch and safetensors write them. */
  shape: number[];
  /** Absolute byte offset of the data within the file's bytes. */
  byteOffset: number;
  /** Size of the data in bytes. */
  byteLength: number;
}

/** GGUF's value type numbers. */
const VALUE = {
  U8: 0,
  I8: 1,
  U16: 2,
  I16: 3,
  U32: 4,
  I32: 5,
  F32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  U64: 10,
  I64: 11,
  F64: 12,
} as const;

/** Bytes of each fixed-size value type. */
const VALUE_SIZES: Record<number, number> = {
  0: 1,
  1: 1,
  2: 2,
  3: 2,
  4: 4,
  5: 4,
  6: 4,
  7: 1,
  10: 8,
  11: 8,
  12: 8,
};

/** ggml's GGML_MAX_DIMS. */
const MAX_DIMS = 4;
/** The alignment when `general.alignment` is absent. */
const DEFAULT_ALIGNMENT = 32;

/** Reads the header fields in order, failing with the field's name on any bound. */
class Cursor {
  position = 0;
  readonly #view: DataView;
  readonly #decoder = new TextDecoder("utf-8", { fatal: true });

  constructor(readonly bytes: Uint8Array, readonly fail: (problem: string) => never) {
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get left(): number {
    return this.bytes.length - this.position;
  }

  #need(count: number, what: string): number {
    if (count > this.left) {
      this.fail(
        `Ends inside ${what}: it needs ${count} bytes at offset ${this.position} but the file has ${this.bytes.length}`,
      );
    }
    const at = this.position;
    this.position += count;
    return at;
  }

  u32(what: string): number {
    return this.#view.getUint32(this.#need(4, what), true);
  }

  /** A u64 that must be a safe integer (a count, size or offset). */
  size(what: string): number {
    const value = this.#view.getBigUint64(this.#need(8, what), true);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`${what} is ${value}, beyond any file`);
    return Number(value);
  }

  string(what: string): string {
    const length = this.size(`the length of ${what}`);
    const at = this.#need(length, what);
    try {
      return this.#decoder.decode(this.bytes.subarray(at, at + length));
    } catch {
      return this.fail(`${what} is not valid UTF-8`);
    }
  }

  scalar(type: number, what: string): number | bigint | boolean {
    const at = this.#need(VALUE_SIZES[type], what);
    const view = this.#view;
    switch (type) {
      case VALUE.U8:
        return view.getUint8(at);
      case VALUE.I8:
        return view.getInt8(at);
      case VALUE.U16:
        return view.getUint16(at, true);
      case VALUE.I16:
        return view.getInt16(at, true);
      case VALUE.U32:
        return view.getUint32(at, true);
      case VALUE.I32:
        return view.getInt32(at, true);
      case VALUE.F32:
        return view.getFloat32(at, true);
      case VALUE.BOOL: {
        const byte = view.getUint8(at);
        if (byte > 1) this.fail(`${what} is a bool holding ${byte}, not 0 or 1`);
        return byte === 1;
      }
      case VALUE.U64:
        return safe(view.getBigUint64(at, true));
      case VALUE.I64:
        return safe(view.getBigInt64(at, true));
      default:
        return view.getFloat64(at, true);
    }
  }

  value(type: number, what: string, depth = 0): GgufValue {
    if (type === VALUE.STRING) return this.string(what);
    if (type in VALUE_SIZES) return this.scalar(type, what);
    if (type !== VALUE.ARRAY) return this.fail(`${what} has unknown value type ${type}`);
    if (depth > 0) this.fail(`${what} is an array of arrays, which GGUF metadata does not use`);
    const itemType = this.u32(`the element type of ${what}`);
    const count = this.size(`the length of ${what}`);
    // The smallest element (a byte, or a string's 8-byte length) bounds the count by the bytes left.
    const smallest = itemType === VALUE.STRING ? 8 : VALUE_SIZES[itemType] ?? 1;
    if (count * smallest > this.left) {
      this.fail(`${what} claims ${count} elements but only ${this.left} bytes are left`);
    }
    const items: GgufValue[] = new Array(count);
    for (let i = 0; i < count; i++) items[i] = this.value(itemType, `${what}[${i}]`, depth + 1);
    return items;
  }
}

function safe(value: bigint): number | bigint {
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(value)
    : value;
}

/** Reads `length` bytes of a file from byte `offset` on, all of them or throws. */
export type ReadRange = (offset: number, length: number) => Uint8Array;

/**
 * A parsed GGUF file: its metadata and tensor infos, validated, plus the
 * file's bytes, or its first bytes and a way to read the rest.
 */
export class GgufFile {
  /** The path or URL the bytes came from; used in error messages. */
  readonly file: string;
  /** The whole file, or its first bytes where tensors are read as asked ({@link GgufFile.parseHead}). */
  readonly bytes: Uint8Array;
  /** The format version (2 or 3). */
  readonly version: number;
  /** The tensor data alignment in bytes. */
  readonly alignment: number;
  /** Every metadata key, in file order. */
  readonly metadata: Map<string, GgufValue>;
  /** Every tensor, by name, in file order. */
  readonly tensors: Map<string, GgufTensorInfo>;
  readonly #readRange: ReadRange | null;

  private constructor(
    file: string,
    bytes: Uint8Array,
    version: number,
    alignment: number,
    metadata: Map<string, GgufValue>,
    tensors: Map<string, GgufTensorInfo>,
    readRange: ReadRange | null,
  ) {
    this.file = file;
    this.bytes = bytes;
    this.#readRange = readRange;
    this.version = version;
    this.alignment = alignment;
    this.metadata = metadata;
    this.tensors = tensors;
  }

  /**
   * Parses and validates a GGUF file held in memory: the magic and version,
   * every metadata key and value, the alignment, every tensor's name,
   * dimensions, type, offset and size, that the data lies inside the file and
   * that no two tensors overlap. No tensor data is read.
   *
   * @param bytes The whole file.
   * @param file The file's path or URL, for error messages.
   * @throws {ModelFileError} When anything about the file is wrong.
   */
  static parse(bytes: Uint8Array, file: string): GgufFile {
    return GgufFile.#parse(bytes, bytes.length, file, null);
  }

  /**
   * Parses and validates a GGUF file of `size` bytes as {@link parse} does,
   * from its first bytes `head`, which must hold its header (the metadata and
   * tensor infos); tensors past them are read with `readRange` when asked
   * for, each into a new array, so that the file is never held whole.
   *
   * @throws {ModelFileError} When anything about the file is wrong, or the
   * header does not end inside `head` ("Ends inside …").
   */
  static parseHead(head: Uint8Array, size: number, file: string, readRange: ReadRange): GgufFile {
    return GgufFile.#parse(head, size, file, readRange);
  }

  static #parse(
    bytes: Uint8Array,
    size: number,
    file: string,
    readRange: ReadRange | null,
  ): GgufFile {
    const fail = (problem: string): never => {
      throw new ModelFileError(file, problem);
    };
    const cursor = new Cursor(bytes, fail);
    if (bytes.length < 4 || new TextDecoder().decode(bytes.subarray(0, 4)) !== "GGUF") {
      fail('Not a GGUF file: it does not start with the magic bytes "GGUF"');
    }
    cursor.position = 4;
    const version = cursor.u32("the version");
    if (version !== 2 && version !== 3) {
      fail(
        version > 0xffff
          ? `Version field reads ${version}: a big-endian GGUF file, which is not supported`
          : `Unsupported GGUF version ${version}: versions 2 and 3 are read`,
      );
    }
    const tensorCount = cursor.size("the tensor count");
    const kvCount = cursor.size("the metadata count");
    // Each pair needs at least a key length, a value type and one byte; each tensor info more.
    if (kvCount * 13 > cursor.left) {
      fail(`Claims ${kvCount} metadata pairs, more than fit in the file`);
    }
    if (tensorCount * 28 > cursor.left) {
      fail(`Claims ${tensorCount} tensors, more than fit in the file`);
    }

    const metadata = new Map<string, GgufValue>();
    for (let i = 0; i < kvCount; i++) {
      const key = cursor.string(`metadata key #${i}`);
      if (metadata.has(key)) fail(`Metadata key "${key}" appears twice`);
      const type = cursor.u32(`the value type of "${key}"`);
      metadata.set(key, cursor.value(type, `metadata "${key}"`));
    }

    let alignment = DEFAULT_ALIGNMENT;
    if (metadata.has("general.alignment")) {
      const value = metadata.get("general.alignment");
      if (
        typeof value !== "number" || !Number.isInteger(value) || value <= 0 ||
        (value & (value - 1)) !== 0
      ) {
        fail(`Metadata "general.alignment" must be a power of two, got ${String(value)}`);
      }
      alignment = value as number;
    }

    const pending: { info: GgufTensorInfo; offset: number }[] = [];
    const names = new Set<string>();
    for (let i = 0; i < tensorCount; i++) {
      const name = cursor.string(`the name of tensor #${i}`);
      const label = `Tensor "${name}"`;
      if (names.has(name)) fail(`${label} appears twice`);
      names.add(name);
      const nDims = cursor.u32(`the dimension count of ${label}`);
      if (nDims < 1 || nDims > MAX_DIMS) {
        fail(`${label} has ${nDims} dimensions; GGUF tensors have 1 to ${MAX_DIMS}`);
      }
      const dims: number[] = [];
      for (let d = 0; d < nDims; d++) dims.push(cursor.size(`dimension ${d} of ${label}`));
      const type = cursor.u32(`the type of ${label}`);
      const offset = cursor.size(`the offset of ${label}`);
      const ggmlType = GGML_TYPES.get(type);
      if (!ggmlType) fail(`${label} has unknown ggml type ${type}`);
      const { name: typeName, blockSize, typeSize } = ggmlType as GgmlType;
      let elements = 1;
      for (const d of dims) {
        if (d === 0) fail(`${label} has an empty dimension in [${dims.join(", ")}]`);
        elements *= d;
      }
      if (!Number.isSafeInteger(elements * typeSize)) {
        fail(`${label} with dimensions [${dims.join(", ")}] is larger than any file`);
      }
      if (dims[0] % blockSize !== 0) {
        fail(
          `${label} has rows of ${
            dims[0]
          } elements, not a multiple of ${typeName}'s block of ${blockSize}`,
        );
      }
      if (offset % alignment !== 0) {
        fail(`${label} starts at offset ${offset}, not a multiple of the alignment ${alignment}`);
      }
      pending.push({
        info: {
          name,
          type,
          dims,
          shape: dims.toReversed(),
          byteOffset: 0,
          byteLength: (elements / blockSize) * typeSize,
        },
        offset,
      });
    }

    const dataStart = Math.ceil(cursor.position / alignment) * alignment;
    if (dataStart > size && tensorCount > 0) {
      fail(`Ends at byte ${size}, before its tensor data (at ${dataStart})`);
    }
    const dataLength = size - dataStart;
    const tensors = new Map<string, GgufTensorInfo>();
    for (const { info, offset } of pending) {
      if (offset + info.byteLength > dataLength) {
        fail(
          `Tensor "${info.name}" ([${info.dims.join(", ")}], ${typeName(info.type)}) needs bytes ` +
            `${offset} to ${offset + info.byteLength} of the data section, which has ${dataLength}`,
        );
      }
      info.byteOffset = dataStart + offset;
      tensors.set(info.name, Object.freeze(info));
    }
    const spans = [...tensors.values()].sort((a, b) => a.byteOffset - b.byteOffset);
    for (let i = 1; i < spans.length; i++) {
      const previous = spans[i - 1];
      if (spans[i].byteOffset < previous.byteOffset + previous.byteLength) {
        fail(`Tensors "${previous.name}" and "${spans[i].name}" overlap in the data section`);
      }
    }
    return new GgufFile(file, bytes, version, alignment, metadata, tensors, readRange);
  }

  /** Whether the file holds a tensor called `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** The info of tensor `name`; a missing one is a {@link ModelFileError}. */
  info(name: string): GgufTensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new ModelFileError(this.file, `Missing tensor "${name}"`);
    return info;
  }

  /**
   * Whether tensor `name` lies past {@link GgufFile.bytes}, so that
   * {@link raw} reads it from the file each time.
   */
  isRead(name: string): boolean {
    const { byteOffset, byteLength } = this.info(name);
    return byteOffset + byteLength > this.bytes.length;
  }

  /**
   * The raw bytes of tensor `name`: a view of {@link GgufFile.bytes}, or
   * where it lies past them ({@link isRead}), a new array read from the file.
   */
  raw(name: string): Uint8Array {
    const { byteOffset, byteLength } = this.info(name);
    if (this.isRead(name)) return this.#readRange!(byteOffset, byteLength);
    return this.bytes.subarray(byteOffset, byteOffset + byteLength);
  }

  /**
   * Tensor `name` as 32-bit floats: F32 as a view of the file's bytes where
   * aligned (else a copy), F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K converted.
   *
   * @throws {ModelFileError} For any other type, naming it.
   */
  float32(name: string): Float32Array {
    const info = this.info(name);
    const elements = info.dims.reduce((a, b) => a * b, 1);
    if (
      info.type === GGML.F32 && !this.isRead(name) &&
      (this.bytes.byteOffset + info.byteOffset) % 4 === 0
    ) {
      return new Float32Array(this.bytes.buffer, this.bytes.byteOffset + info.byteOffset, elements);
    }
    if (!DEQUANTIZERS.has(info.type)) {
      throw new ModelFileError(
        this.file,
        `Tensor "${name}" has type ${typeName(info.type)}, which this library cannot read ` +
          `(it reads ${[...DEQUANTIZERS.keys()].map(typeName).join(", ")})`,
      );
    }
    return dequantize(info.type, this.raw(name), elements);
  }

  /** A metadata value that must be a non-negative integer; `fallback` when absent. */
  integer(key: string, fallback?: number): number {
    const value = this.metadata.get(key);
    if (value === undefined && fallback !== undefined) return fallback;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 0) {
      throw new ModelFileError(
        this.file,
        value === undefined
          ? `Missing metadata "${key}"`
          : `Metadata "${key}" must be a non-negative integer, got ${show(value)}`,
      );
    }
    return value;
  }

  /** A metadata value that must be a string; `fallback` when absent. */
  string(key: string, fallback?: string): string {
    const value = this.metadata.get(key);
    if (value === undefined && fallback !== undefined) return fallback;
    if (typeof value !== "string") {
      throw new ModelFileError(
        this.file,
        value === undefined
          ? `Missing metadata "${key}"`
          : `Metadata "${key}" must be a string, got ${show(value)}`,
      );
    }
    return value;
  }
}

function show(value: GgufValue): string {
  if (Array.isArray(value)) return `an array of ${value.length}`;
  return typeof value === "string" ? JSON.stringify(value.slice(0, 80)) : String(value);
}

/** A ggml type's name, or its number where unknown. */
export function typeName(type: number): string {
  return GGML_TYPES.get(type)?.name ?? `type ${type}`;
}

type Dequantizer = (bytes: Uint8Array, out: Float32Array) => void;

const DEQUANTIZERS: ReadonlyMap<number, Dequantizer> = new Map<number, Dequantizer>([
  [GGML.F32, (bytes, out) => {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  }],
  [GGML.F16, (bytes, out) => {
    for (let i = 0; i < out.length; i++) out[i] = f16ToF32(bytes[2 * i] | (bytes[2 * i + 1] << 8));
  }],
  [GGML.BF16, (bytes, out) => {
    for (let i = 0; i < out.length; i++) {
      out[i] = bf16ToF32(bytes[2 * i] | (bytes[2 * i + 1] << 8));
    }
  }],
  [GGML.Q8_0, dequantizeQ8_0],
  [GGML.Q4_0, dequantizeQ4_0],
  [GGML.Q4_K, dequantizeQ4_K],
  [GGML.Q6_K, dequantizeQ6_K],
]);

/**
 * `count` values of ggml type `type` from their bytes (whole blocks).
 *
 * @throws {RangeError} For a type without a dequantizer or bytes of the wrong size.
 */
export function dequantize(type: number, bytes: Uint8Array, count: number): Float32Array {
  const dequantizer = DEQUANTIZERS.get(type);
  const ggmlType = GGML_TYPES.get(type);
  if (!dequantizer || !ggmlType) throw new RangeError(`Cannot dequantize ${typeName(type)}`);
  if (
    count % ggmlType.blockSize !== 0 ||
    bytes.length !== count / ggmlType.blockSize * ggmlType.typeSize
  ) {
    throw new RangeError(
      `${count} ${ggmlType.name} values take ${
        count / ggmlType.blockSize * ggmlType.typeSize
      } bytes, got ${bytes.length}`,
    );
  }
  const out = new Float32Array(count);
  dequantizer(bytes, out);
  return out;
}

function half(bytes: Uint8Array, at: number): number {
  return f16ToF32(bytes[at] | (bytes[at + 1] << 8));
}

/** Q8_0: blocks of 32, an f16 scale d then 32 int8 q; x = d·q. */
function dequantizeQ8_0(bytes: Uint8Array, out: Float32Array): void {
  const signed = new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let block = 0, at = 0; block < out.length / 32; block++, at += 34) {
    const d = half(bytes, at);
    for (let j = 0; j < 32; j++) out[block * 32 + j] = d * signed[at + 2 + j];
  }
}

/**
 * Q4_0: blocks of 32, an f16 scale d then 16 bytes; byte j holds element j in
 * its low nibble and element j + 16 in its high one, each q - 8; x = d·(q - 8).
 */
function dequantizeQ4_0(bytes: Uint8Array, out: Float32Array): void {
  for (let block = 0, at = 0; block < out.length / 32; block++, at += 18) {
    const d = half(bytes, at);
    const base = block * 32;
    for (let j = 0; j < 16; j++) {
      const byte = bytes[at + 2 + j];
      out[base + j] = d * ((byte & 0x0f) - 8);
      out[base + j + 16] = d * ((byte >> 4) - 8);
    }
  }
}

/**
 * The 6-bit scale and min of sub-block `sub` (0 to 7) of the Q4_K super-block
 * whose 12 packed bytes start at `at`: sub-blocks 0–3 in the low 6 bits of
 * bytes 0–3 (scales) and 4–7 (mins); 4–7 in the nibbles of bytes 8–11, their
 * top 2 bits in the top bits of bytes 0–7.
 */
export function q4KScaleMin(bytes: Uint8Array, at: number, sub: number): [number, number] {
  if (sub < 4) return [bytes[at + sub] & 63, bytes[at + sub + 4] & 63];
  return [
    (bytes[at + sub + 4] & 0x0f) | ((bytes[at + sub - 4] >> 6) << 4),
    (bytes[at + sub + 4] >> 4) | ((bytes[at + sub] >> 6) << 4),
  ];
}

/**
 * Q4_K: super-blocks of 256 in 8 sub-blocks of 32: f16 d and dmin, 12 bytes
 * packing a 6-bit scale and a 6-bit min per sub-block, then 128 bytes of
 * nibbles (each 32 bytes: sub-block 2i in the low nibbles, 2i + 1 in the
 * high ones); x = d·scale·q − dmin·min, rounded to f32 at each product as
 * ggml computes it.
 */
function dequantizeQ4_K(bytes: Uint8Array, out: Float32Array): void {
  const f = Math.fround;
  for (let block = 0, at = 0; block < out.length / 256; block++, at += 144) {
    const d = half(bytes, at);
    const dmin = half(bytes, at + 2);
    const qs = at + 16;
    for (let sub = 0; sub < 8; sub++) {
      const [scale, min] = q4KScaleMin(bytes, at + 4, sub);
      const dScale = f(d * scale);
      const dMin = f(dmin * min);
      const shift = (sub & 1) * 4;
      const chunk = qs + (sub >> 1) * 32;
      const base = block * 256 + sub * 32;
      for (let l = 0; l < 32; l++) {
        out[base + l] = f(dScale * ((bytes[chunk + l] >> shift) & 0x0f)) - dMin;
      }
    }
  }
}

/**
 * Q6_K: super-blocks of 256: 128 bytes of low nibbles, 64 bytes of high
 * 2-bit pairs, 16 int8 scales (one per 16 values), then an f16 d. Each half
 * of 128 values takes 64 low-nibble bytes and 32 high bytes; its 32-value
 * chunk k takes low nibbles (k < 2) or high ones of bytes (k & 1)·32 + l,
 * and bits 2k of the high bytes; x = d·scale·(q − 32).
 */
function dequantizeQ6_K(bytes: Uint8Array, out: Float32Array): void {
  const f = Math.fround;
  const signed = new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let block = 0, at = 0; block < out.length / 256; block++, at += 210) {
    const d = half(bytes, at + 208);
    for (let e = 0; e < 256; e++) {
      const halfBlock = e >> 7, chunk = (e >> 5) & 3, l = e & 31;
      const lowByte = bytes[at + halfBlock * 64 + (chunk & 1) * 32 + l];
      const low = chunk < 2 ? lowByte & 0x0f : lowByte >> 4;
      const high = (bytes[at + 128 + halfBlock * 32 + l] >> (2 * chunk)) & 3;
      out[block * 256 + e] = f(d * signed[at + 192 + (e >> 4)]) * ((low | (high << 4)) - 32);
    }
  }
}
