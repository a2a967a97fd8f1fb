/**
 * A self-contained reader and writer for the
 * [safetensors](https://github.com/huggingface/safetensors) format, written
 * from the format's rules.
 *
 * Layout: 8 bytes little-endian u64 `N` (header size), `N` bytes of UTF-8 JSON
 * (possibly padded with trailing spaces), then the data section. Each header
 * key except `__metadata__` maps to `{dtype, shape, data_offsets: [begin, end]}`
 * with offsets relative to the start of the data section (byte `8 + N`).
 *
 * {@linkcode SafetensorsFile.parse} validates the whole header (bounds,
 * dtypes, shapes, sizes, overlaps) before any tensor data is touched, and
 * reports problems as {@linkcode ModelFileError}s naming the file.
 *
 * Typed-array views assume a little-endian host (true of every platform Deno
 * runs on).
 *
 * @example Write a file, then read it back
 * ```ts
 * import { SafetensorsFile, writeSafetensors } from "./safetensors.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const bytes = writeSafetensors({
 *   "w": { dtype: "F16", shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
 * }, { format: "pt" });
 * const st = SafetensorsFile.parse(bytes, "w.safetensors");
 * assertEquals(st.info("w").shape, [2, 2]);
 * assertEquals(st.float32("w"), new Float32Array([1, 2, 3, 4]));
 * ```
 *
 * @module
 */

import { ModelFileError } from "./errors.ts";
import type { Halves } from "./quant.ts";

/** The tensor element types this module understands. */
export type DType = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

/** Where one tensor lives in a parsed safetensors file. */
export interface TensorInfo {
  /** The tensor's name (its key in the header). */
  name: string;
  /** The element type. */
  dtype: DType;
  /** The dimensions, outermost first; `[]` for a scalar. */
  shape: number[];
  /** Absolute byte offset of the tensor's data within the file's bytes. */
  byteOffset: number;
  /** Size of the tensor's data in bytes (elements times element size). */
  byteLength: number;
}

/** Bytes per element for each supported dtype. */
const DTYPE_SIZES: Readonly<Record<DType, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

/** Largest header accepted, in bytes (the reference implementation's limit). */
const MAX_HEADER_BYTES = 100_000_000;

/**
 * Most header entries accepted. Checkpoints hold hundreds to a few thousand
 * tensors per file; past this, parsing alone would take seconds.
 */
const MAX_HEADER_ENTRIES = 100_000;

/** How many tensor names a "missing tensor" message lists. */
const NAMES_IN_MESSAGES = 5;

function isDType(s: string): s is DType {
  return Object.hasOwn(DTYPE_SIZES, s);
}

/** A short description of a JSON value's kind, for messages. */
function kindOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return "an object";
  return `a ${typeof v}`;
}

/** A JSON rendering of `v` cut to a readable length, for messages. */
function show(v: unknown, max = 80): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  if (Array.isArray(v) && v.every((x) => typeof x === "number")) s = `[${v.join(", ")}]`;
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

/** A quoted tensor name for messages, cut if absurdly long. */
function q(name: string): string {
  return show(name, 200);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/** The 8-byte length, then the JSON header: checked, parsed, and where the data starts. */
function readHeader(
  bytes: Uint8Array,
  fail: (problem: string) => never,
): { header: Record<string, unknown>; dataStart: number } {
  if (bytes.length < 8) {
    fail(`File is ${bytes.length} bytes, too short for the 8-byte header length`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, 8);
  const lo = dv.getUint32(0, true);
  const hi = dv.getUint32(4, true);
  if (hi !== 0 || lo > MAX_HEADER_BYTES) {
    const n = (BigInt(hi) << 32n) | BigInt(lo);
    fail(
      `Header length ${n} is absurdly large (over the ${MAX_HEADER_BYTES}-byte limit); ` +
        `the file is probably not safetensors`,
    );
  }
  const headerLength = lo;
  if (8 + headerLength > bytes.length) {
    fail(`Header length ${headerLength} runs past the end of the file (${bytes.length} bytes)`);
  }
  const dataStart = 8 + headerLength;

  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(
      bytes.subarray(8, dataStart),
    );
  } catch {
    return fail("Header is not valid UTF-8");
  }
  const keys = scanTopLevelKeys(text);
  if (keys.count > MAX_HEADER_ENTRIES) {
    return fail(
      `Header has more than ${MAX_HEADER_ENTRIES} entries; a model file holds far fewer ` +
        `tensors (shard larger models)`,
    );
  }
  if (keys.duplicate !== undefined) {
    return fail(`Header names tensor ${q(keys.duplicate)} more than once`);
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (e) {
    return fail(`Header is not valid JSON: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (!isPlainObject(header)) {
    return fail(`Header is not a JSON object (found ${kindOf(header)})`);
  }
  return { header, dataStart };
}

/**
 * Counts the keys of the header's top-level object (stopping past
 * {@link MAX_HEADER_ENTRIES}) and finds the first that appears twice:
 * `JSON.parse` keeps the last of duplicates silently; the format forbids them.
 * One linear pass over the text; a malformed text is left for `JSON.parse` to
 * report.
 */
function scanTopLevelKeys(text: string): { count: number; duplicate?: string } {
  const seen = new Set<string>();
  let depth = 0;
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      const start = i;
      let escaped = false;
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 0x5c /* \ */) {
          escaped = true;
          i++;
        } else if (d === 0x22) break;
      }
      if (depth === 1 && expectKey) {
        const raw = text.slice(start + 1, i);
        let key = raw;
        if (escaped) {
          try {
            key = JSON.parse(text.slice(start, i + 1));
          } catch {
            return { count: seen.size };
          }
        }
        if (seen.has(key)) return { count: seen.size, duplicate: key };
        seen.add(key);
        if (seen.size > MAX_HEADER_ENTRIES) return { count: seen.size };
        expectKey = false;
      }
    } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      depth++;
      if (depth === 1) expectKey = c === 0x7b;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      depth--;
    } else if (c === 0x2c /* , */ && depth === 1) {
      expectKey = true;
    }
  }
  return { count: seen.size };
}

/**
 * The dtypes of the tensors a safetensors file declares, read from its first
 * bytes alone (`head` must hold the whole header), or null where `head` does
 * not hold a well-formed header: for deciding how to read the rest.
 */
export function headerDtypes(head: Uint8Array): string[] | null {
  try {
    const { header } = readHeader(head, (problem) => {
      throw new Error(problem);
    });
    return Object.entries(header).filter(([name]) => name !== "__metadata__").map(([, entry]) =>
      isPlainObject(entry) ? String(entry.dtype) : ""
    );
  } catch {
    return null;
  }
}

/**
 * A parsed safetensors file: the header, validated, plus the file's bytes.
 * Tensor data is converted lazily by {@linkcode SafetensorsFile.float32} and
 * {@linkcode SafetensorsFile.int32}.
 */
export class SafetensorsFile {
  /** The path or URL the bytes came from; used in error messages. */
  readonly file: string;
  /** The whole file. */
  readonly bytes: Uint8Array;
  /** The header's `__metadata__` map (empty when absent). */
  readonly metadata: Record<string, string>;
  /** Every tensor, by name, in header order. */
  readonly tensors: Map<string, TensorInfo>;

  private constructor(
    file: string,
    bytes: Uint8Array,
    metadata: Record<string, string>,
    tensors: Map<string, TensorInfo>,
  ) {
    this.file = file;
    this.bytes = bytes;
    this.metadata = metadata;
    this.tensors = tensors;
  }

  /**
   * Parses and validates a safetensors file held in memory. Checks the header
   * length, that the header is a UTF-8 JSON object, every tensor's dtype,
   * shape and data offsets, that each tensor's byte size matches its shape and
   * dtype, that all data lies inside the file, and that no two tensors
   * overlap. No tensor data is read.
   *
   * @param bytes The whole file.
   * @param file The file's path or URL, for error messages.
   * @returns The parsed file.
   * @throws {ModelFileError} When anything about the file is wrong.
   */
  static parse(bytes: Uint8Array, file: string): SafetensorsFile {
    return SafetensorsFile.#parse(bytes, bytes.length, file);
  }

  /**
   * Parses and validates the header alone, from the file's first bytes and its
   * total length, with every check of {@linkcode SafetensorsFile.parse}: for
   * checking tensor shapes before the data is read. The result's
   * {@linkcode SafetensorsFile.info} works; reading tensor data does not.
   *
   * @param head The file's first bytes, holding at least the whole header.
   * @param fileLength The whole file's length in bytes.
   * @param file The file's path or URL, for error messages.
   * @throws {ModelFileError} When the header is wrong or `head` cuts it.
   */
  static parseHeader(head: Uint8Array, fileLength: number, file: string): SafetensorsFile {
    return SafetensorsFile.#parse(head, fileLength, file);
  }

  static #parse(bytes: Uint8Array, fileLength: number, file: string): SafetensorsFile {
    const fail = (problem: string): never => {
      throw new ModelFileError(file, problem);
    };
    if (fileLength < bytes.length) fail(`Holds more than its ${fileLength} bytes`);
    const { header, dataStart } = readHeader(bytes, fail);
    const dataLength = fileLength - dataStart;

    let metadata: Record<string, string> = {};
    const tensors = new Map<string, TensorInfo>();
    for (const [name, entry] of Object.entries(header)) {
      if (name === "__metadata__") {
        metadata = parseMetadata(entry, fail);
        continue;
      }
      if (!name.isWellFormed()) {
        fail(`Tensor name ${q(name)} holds a lone UTF-16 surrogate`);
      }
      const t = q(name);
      if (!isPlainObject(entry)) {
        fail(`Tensor ${t} entry is not an object (found ${kindOf(entry)})`);
      }
      const e = entry as Record<string, unknown>;
      for (const field of ["dtype", "shape", "data_offsets"]) {
        if (!Object.hasOwn(e, field)) fail(`Tensor ${t} is missing "${field}"`);
      }

      const dtype = e.dtype;
      if (typeof dtype !== "string") fail(`Tensor ${t} dtype is ${kindOf(dtype)}, not a string`);
      if (!isDType(dtype as string)) fail(`Tensor ${t} has unknown dtype ${show(dtype)}`);

      const shape = e.shape;
      if (!Array.isArray(shape)) fail(`Tensor ${t} shape is ${kindOf(shape)}, not an array`);
      for (const d of shape as unknown[]) {
        if (!isNonNegInt(d)) {
          fail(
            `Tensor ${t} has invalid shape dimension ${show(d)} in ${show(shape)} ` +
              `(dimensions must be non-negative integers)`,
          );
        }
      }

      const offsets = e.data_offsets;
      if (!Array.isArray(offsets) || offsets.length !== 2) {
        fail(`Tensor ${t} data_offsets must be an array of two integers, found ${show(offsets)}`);
      }
      const [begin, end] = offsets as unknown[];
      if (!isNonNegInt(begin) || !isNonNegInt(end)) {
        fail(
          `Tensor ${t} has invalid data_offsets ${show(offsets)} ` +
            `(offsets must be non-negative integers)`,
        );
      }
      const b = begin as number, en = end as number;
      if (b > en) fail(`Tensor ${t} data_offsets [${b}, ${en}] have begin > end`);
      if (en > dataLength) {
        fail(
          `Tensor ${t} data_offsets [${b}, ${en}] run past the end of the data section ` +
            `(${dataLength} bytes)`,
        );
      }

      const dims = (shape as number[]).slice();
      const dt = dtype as DType;
      let need = BigInt(DTYPE_SIZES[dt]);
      for (const d of dims) need *= BigInt(d);
      const have = en - b;
      if (need !== BigInt(have)) {
        fail(
          `Tensor ${t} holds ${have} bytes but dtype ${dt} and shape ${show(dims)} need ${need}`,
        );
      }
      tensors.set(
        name,
        Object.freeze({
          name,
          dtype: dt,
          shape: Object.freeze(dims) as number[],
          byteOffset: dataStart + b,
          byteLength: have,
        }),
      );
    }

    // The format's rule: the tensors cover the data section exactly, in some
    // order, with no overlap, no gap and nothing after the last one. (A header
    // length a few bytes short still parses, so this is what catches it.)
    const spans = [...tensors.values()].filter((i) => i.byteLength > 0)
      .sort((x, y) => x.byteOffset - y.byteOffset);
    const r = (s: TensorInfo) =>
      `[${s.byteOffset - dataStart}, ${s.byteOffset - dataStart + s.byteLength}]`;
    let covered = dataStart;
    for (let i = 0; i < spans.length; i++) {
      const cur = spans[i];
      if (cur.byteOffset < covered) {
        const prev = spans[i - 1];
        fail(
          `Tensors ${q(prev.name)} and ${q(cur.name)} overlap in the data section ` +
            `(${r(prev)} and ${r(cur)})`,
        );
      }
      if (cur.byteOffset > covered) {
        fail(
          `Data section has a gap of ${cur.byteOffset - covered} bytes before tensor ` +
            `${q(cur.name)} ${r(cur)}`,
        );
      }
      covered = cur.byteOffset + cur.byteLength;
    }
    if (covered !== fileLength) {
      fail(
        `Data section has ${fileLength - covered} bytes after the last tensor ` +
          `(the tensors cover ${covered - dataStart} of its ${dataLength} bytes; ` +
          `is the header length right?)`,
      );
    }

    return new SafetensorsFile(file, bytes, metadata, tensors);
  }

  /** Whether the file holds a tensor called `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /**
   * The location, dtype and shape of tensor `name`.
   *
   * @throws {ModelFileError} `Missing tensor "name"` (listing a few of the
   * names the file does hold) when there is no such tensor.
   */
  info(name: string): TensorInfo {
    const i = this.tensors.get(name);
    if (i) return i;
    const names = [...this.tensors.keys()];
    const some = names.slice(0, NAMES_IN_MESSAGES).map(q).join(", ");
    const more = names.length > NAMES_IN_MESSAGES ? ", …" : "";
    throw new ModelFileError(
      this.file,
      names.length === 0
        ? `Missing tensor ${q(name)}; the file holds no tensors`
        : `Missing tensor ${q(name)}; the file holds ${names.length} tensor${
          names.length === 1 ? "" : "s"
        }: ${some}${more}`,
    );
  }

  /**
   * Tensor `name`'s 16-bit values where its dtype is F16 or BF16: a view of
   * {@linkcode SafetensorsFile.bytes} when 2-byte aligned in the underlying
   * buffer, else a copy; null for any other dtype.
   *
   * @throws {ModelFileError} When the tensor is missing.
   */
  halves(name: string): Halves | null {
    const info = this.info(name);
    if (info.dtype !== "F16" && info.dtype !== "BF16") return null;
    return {
      format: info.dtype === "F16" ? "f16" : "bf16",
      halves: new Uint16Array(
        this.aligned(info, 2),
        this.alignedOffset(info, 2),
        info.byteLength / 2,
      ),
    };
  }

  /**
   * Tensor `name` as 32-bit floats, converted from F32, F16, BF16 or F64.
   * F32 data is returned as a zero-copy view of {@linkcode SafetensorsFile.bytes}
   * when it is 4-byte aligned in the underlying buffer (so writes to it change
   * the file's bytes), and as a copy otherwise; other dtypes always give a new
   * array. F64 is rounded to nearest-even.
   *
   * @throws {ModelFileError} When the tensor is missing or has an integer dtype.
   */
  float32(name: string): Float32Array {
    const info = this.info(name);
    const n = info.byteLength / DTYPE_SIZES[info.dtype];
    switch (info.dtype) {
      case "F32":
        return new Float32Array(this.aligned(info, 4), this.alignedOffset(info, 4), n);
      case "F16":
      case "BF16": {
        const { halves, format } = this.halves(name)!;
        return widenHalves(halves, format);
      }
      case "F64": {
        const src = new Float64Array(this.aligned(info, 8), this.alignedOffset(info, 8), n);
        const out = new Float32Array(n);
        out.set(src);
        return out;
      }
      default:
        throw new ModelFileError(
          this.file,
          `Tensor ${q(name)} has dtype ${info.dtype}, expected a floating-point dtype ` +
            `(F32, F16, BF16 or F64)`,
        );
    }
  }

  /**
   * Tensor `name` as 32-bit integers, from I32 (a zero-copy view when 4-byte
   * aligned, as for {@linkcode SafetensorsFile.float32}) or I64 (copied; every
   * value must fit in 32 bits).
   *
   * @throws {ModelFileError} When the tensor is missing, has another dtype, or
   * holds an I64 value outside the 32-bit range.
   */
  int32(name: string): Int32Array {
    const info = this.info(name);
    const n = info.byteLength / DTYPE_SIZES[info.dtype];
    if (info.dtype === "I32") {
      return new Int32Array(this.aligned(info, 4), this.alignedOffset(info, 4), n);
    }
    if (info.dtype === "I64") {
      const src = new Int32Array(this.aligned(info, 4), this.alignedOffset(info, 4), 2 * n);
      const out = new Int32Array(n);
      for (let i = 0; i < n; i++) {
        const lo = src[2 * i], hi = src[2 * i + 1];
        if (hi !== (lo >> 31)) {
          const v = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
          throw new ModelFileError(
            this.file,
            `Tensor ${q(name)} (I64) value ${v} at index ${i} does not fit in 32 bits`,
          );
        }
        out[i] = lo;
      }
      return out;
    }
    throw new ModelFileError(
      this.file,
      `Tensor ${q(name)} has dtype ${info.dtype}, expected an integer dtype (I32 or I64)`,
    );
  }

  /** The buffer to view tensor data through: the file's own, or an aligned copy. */
  private aligned(info: TensorInfo, align: number): ArrayBufferLike {
    const abs = this.bytes.byteOffset + info.byteOffset;
    if (abs % align === 0) return this.bytes.buffer;
    return this.bytes.slice(info.byteOffset, info.byteOffset + info.byteLength).buffer;
  }

  /** The byte offset matching {@linkcode SafetensorsFile.aligned}'s buffer. */
  private alignedOffset(info: TensorInfo, align: number): number {
    const abs = this.bytes.byteOffset + info.byteOffset;
    return abs % align === 0 ? abs : 0;
  }
}

function parseMetadata(entry: unknown, fail: (p: string) => never): Record<string, string> {
  if (!isPlainObject(entry)) {
    return fail(`__metadata__ is ${kindOf(entry)}, expected an object of strings`);
  }
  const out: [string, string][] = [];
  for (const [k, v] of Object.entries(entry)) {
    if (typeof v !== "string") {
      fail(`__metadata__ value for key ${q(k)} is ${kindOf(v)}, expected a string`);
    }
    out.push([k, v as string]);
  }
  // fromEntries defines own properties, so a "__proto__" key stays a plain key.
  return Object.fromEntries(out);
}

/**
 * Reads a sharded checkpoint's index (`model.safetensors.index.json`, already
 * parsed from JSON): `{"metadata"?: {...}, "weight_map": {tensor: shardFile}}`.
 * Shard names must be plain file names in the index's folder (no `/`, no `\`,
 * not `.` or `..`).
 *
 * @param json The parsed JSON.
 * @param file The index file's path or URL, for error messages.
 * @returns A map from tensor name to shard file name.
 * @throws {ModelFileError} When the index is malformed.
 */
export function parseShardIndex(json: unknown, file: string): Map<string, string> {
  const fail = (problem: string): never => {
    throw new ModelFileError(file, problem);
  };
  if (!isPlainObject(json)) fail(`Shard index is ${kindOf(json)}, expected a JSON object`);
  const obj = json as Record<string, unknown>;
  if (Object.hasOwn(obj, "metadata") && !isPlainObject(obj.metadata)) {
    fail(`Shard index "metadata" is ${kindOf(obj.metadata)}, expected an object`);
  }
  if (!Object.hasOwn(obj, "weight_map")) fail(`Shard index has no "weight_map"`);
  const wm = obj.weight_map;
  if (!isPlainObject(wm)) {
    fail(`Shard index "weight_map" is ${kindOf(wm)}, expected an object`);
  }
  const out = new Map<string, string>();
  for (const [tensor, shard] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof shard !== "string") {
      fail(`Shard index maps tensor ${q(tensor)} to ${kindOf(shard)}, expected a file name`);
    }
    const s = shard as string;
    if (
      s === "" || s === "." || s === ".." || s.includes("/") || s.includes("\\") ||
      s.includes("\0")
    ) {
      fail(
        `Shard index maps tensor ${q(tensor)} to ${q(s)}, which is not a plain file name`,
      );
    }
    out.set(tensor, s);
  }
  if (out.size === 0) fail(`Shard index "weight_map" is empty`);
  return out;
}

/** One tensor for {@linkcode writeSafetensors} (internal alias). */
type WriteEntry = {
  dtype: "F32" | "F16" | "BF16" | "I32";
  shape: number[];
  data: Float32Array | Int32Array;
};

/**
 * Serializes tensors to safetensors bytes. `F32` data is stored as is, or
 * rounded to `F16`/`BF16` (round-to-nearest-even) when asked; `I32` takes an
 * `Int32Array`. Tensors are laid out without gaps, larger element sizes first
 * (otherwise in the given order), so every tensor is aligned to its element
 * size; the header is padded with spaces so the data section starts at a
 * multiple of 8.
 *
 * @param tensors The tensors, by name.
 * @param metadata Optional `__metadata__` (string to string).
 * @returns The file's bytes.
 * @throws {TypeError} When a tensor's data array does not suit its dtype, or
 * the dtype is not one of F32, F16, BF16, I32.
 * @throws {RangeError} When a shape is invalid or does not match the data's
 * length, a metadata value is not a string, or a tensor is named
 * `__metadata__`.
 */
export function writeSafetensors(
  tensors: Record<
    string,
    { dtype: "F32" | "F16" | "BF16" | "I32"; shape: number[]; data: Float32Array | Int32Array }
  >,
  metadata?: Record<string, string>,
): Uint8Array {
  const sizes = { F32: 4, F16: 2, BF16: 2, I32: 4 } as const;
  const entries = Object.entries(tensors);
  for (const [name, t] of entries) {
    if (name === "__metadata__") throw new RangeError(`"__metadata__" cannot name a tensor`);
    if (!Object.hasOwn(sizes, t.dtype)) {
      throw new TypeError(`Tensor ${q(name)}: cannot write dtype ${show(t.dtype)}`);
    }
    const wantInt = t.dtype === "I32";
    if (wantInt ? !(t.data instanceof Int32Array) : !(t.data instanceof Float32Array)) {
      throw new TypeError(
        `Tensor ${q(name)}: dtype ${t.dtype} needs ${wantInt ? "an Int32Array" : "a Float32Array"}`,
      );
    }
    let count = 1;
    for (const d of t.shape) {
      if (!isNonNegInt(d)) throw new RangeError(`Tensor ${q(name)}: bad shape ${show(t.shape)}`);
      count *= d;
    }
    if (count !== t.data.length) {
      throw new RangeError(
        `Tensor ${q(name)}: shape ${
          show(t.shape)
        } holds ${count} elements, data has ${t.data.length}`,
      );
    }
  }
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") throw new RangeError(`Metadata value for ${q(k)} is not a string`);
    }
  }

  // Stable sort: larger elements first keeps every tensor aligned.
  const order = entries.map((e, i) => ({ e, i }))
    .sort((a, b) => sizes[b.e[1].dtype] - sizes[a.e[1].dtype] || a.i - b.i)
    .map((x) => x.e);

  const header: Record<string, unknown> = {};
  const define = (k: string, v: unknown) =>
    Object.defineProperty(header, k, { value: v, enumerable: true, writable: true });
  if (metadata && Object.keys(metadata).length > 0) define("__metadata__", { ...metadata });
  let offset = 0;
  const placed: { t: WriteEntry; at: number }[] = [];
  for (const [name, t] of order) {
    const len = t.data.length * sizes[t.dtype];
    define(name, { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + len] });
    placed.push({ t, at: offset });
    offset += len;
  }

  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil((8 + json.length) / 8) * 8 - 8;
  const headerBytes = new Uint8Array(padded).fill(0x20);
  headerBytes.set(json);
  json = headerBytes;

  const dataStart = 8 + padded;
  const out = new Uint8Array(dataStart + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  for (const { t, at } of placed) {
    const n = t.data.length;
    const pos = dataStart + at;
    if (t.dtype === "F32" || t.dtype === "I32") {
      out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), pos);
      continue;
    }
    const src = new Uint32Array(t.data.buffer, t.data.byteOffset, n);
    const dst = new Uint16Array(out.buffer, pos, n);
    if (t.dtype === "BF16") {
      for (let i = 0; i < n; i++) dst[i] = f32BitsToBf16(src[i]);
    } else {
      for (let i = 0; i < n; i++) dst[i] = f32BitsToF16(src[i]);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Scalar conversions.

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/**
 * The value of an IEEE binary16 (F16) bit pattern, exactly: subnormals,
 * signed zeros and infinities included; NaN for NaN patterns.
 *
 * @param bits The 16-bit pattern (only the low 16 bits are used).
 */
export function f16ToF32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

/**
 * The value of a bfloat16 (BF16) bit pattern (the top half of an F32), exactly.
 *
 * @param bits The 16-bit pattern (only the low 16 bits are used).
 */
export function bf16ToF32(bits: number): number {
  scratchU32[0] = (bits & 0xffff) << 16;
  return scratchF32[0];
}

/**
 * Rounds `x` to the nearest F16 (ties to even) and returns its 16-bit pattern.
 * Exact for any JS number (no double rounding through F32); overflow gives
 * ±infinity, NaN gives the quiet NaN 0x7e00.
 */
export function f32ToF16(x: number): number {
  return encodeMinifloat(x, 5, 10);
}

/**
 * Rounds `x` to the nearest BF16 (ties to even) and returns its 16-bit
 * pattern. Exact for any JS number (no double rounding through F32); overflow
 * gives ±infinity, NaN gives the quiet NaN 0x7fc0.
 */
export function f32ToBf16(x: number): number {
  return encodeMinifloat(x, 8, 7);
}

/** Rounds a non-negative number to an integer, ties to even. */
function roundHalfEven(v: number): number {
  const f = Math.floor(v);
  const d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Encodes `x` in a binary format with the given exponent and mantissa bits. */
function encodeMinifloat(x: number, expBits: number, mantBits: number): number {
  const expMax = (1 << expBits) - 1;
  const infBits = expMax << mantBits;
  if (x !== x) return infBits | (1 << (mantBits - 1));
  const sign = x < 0 || Object.is(x, -0) ? 1 << (expBits + mantBits) : 0;
  const a = Math.abs(x);
  const bias = (1 << (expBits - 1)) - 1;
  const emin = 1 - bias;
  let e: number;
  if (a < 2 ** emin) {
    e = emin;
  } else {
    if (a === Infinity) return sign | infBits;
    e = Math.floor(Math.log2(a));
    if (2 ** e > a) e--;
    else if (2 ** (e + 1) <= a) e++;
    if (e > bias) return sign | infBits;
  }
  // Scale so that the kept mantissa bits are the integer part (exact: power of 2).
  let r = roundHalfEven(a * 2 ** (mantBits - e));
  const implicit = 1 << mantBits;
  if (r === 2 * implicit) {
    r = implicit;
    e++;
  }
  if (r < implicit) return sign | r; // subnormal (or zero); e === emin here
  const field = e + bias;
  if (field >= expMax) return sign | infBits;
  return sign | (field << mantBits) | (r - implicit);
}

/**
 * The F16 bit pattern nearest (ties to even) to an F32 given by its bit
 * pattern: {@link f32ToF16} for F32 values, without floating-point work.
 */
export function f32BitsToF16(u: number): number {
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal result: value = (1.mant) * 2^(exp-127) = M * 2^(e-14) units of 2^-24.
    const shift = 14 - e;
    if (shift > 24) return sign;
    mant |= 0x800000;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1) !== 0)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1) !== 0)) h++; // may carry into inf: correct
  return sign | h;
}

/**
 * `data` as `format` ("f16" or "bf16") bit patterns when every value is
 * exactly one (as a backend keeps an F16 or BF16 checkpoint's matrix), else
 * null, found at the first value that is not. The length is rounded up to
 * even (a zero last), for whole u32 pairs.
 */
export function packHalves(
  data: Float32Array,
  format: "f16" | "bf16",
): Uint16Array<ArrayBuffer> | null {
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const halves = new Uint16Array(data.length + (data.length % 2));
  if (format === "bf16") {
    for (let i = 0; i < data.length; i++) {
      if ((bits[i] & 0xffff) !== 0) return null;
      halves[i] = bits[i] >>> 16;
    }
    return halves;
  }
  for (let i = 0; i < data.length; i++) {
    const half = f32BitsToF16(bits[i]);
    if (f16ToF32(half) !== data[i]) return null;
    halves[i] = half;
  }
  return halves;
}

/**
 * BF16 bit patterns as F16 ones where every value is exactly an f16 (none
 * past f16's range or needing more bits than its subnormals keep), else
 * null, found at the first value that is not. The length is rounded up to
 * even (a zero last), as {@link packHalves} rounds it.
 */
export function bf16AsF16(halves: Uint16Array): Uint16Array<ArrayBuffer> | null {
  const out = new Uint16Array(halves.length + (halves.length % 2));
  for (let i = 0; i < halves.length; i++) {
    const half = f32BitsToF16((halves[i] << 16) >>> 0);
    if (f16ToF32(half) !== bf16ToF32(halves[i])) return null;
    out[i] = half;
  }
  return out;
}

/** F32 bit pattern to BF16 bit pattern, round-to-nearest-even (writer's fast path). */
export function f32BitsToBf16(u: number): number {
  if ((u & 0x7f800000) === 0x7f800000 && (u & 0x7fffff) !== 0) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** F16 or BF16 bit patterns as the float32 values they hold, exactly. */
export function widenHalves(halves: Uint16Array, format: "f16" | "bf16"): Float32Array {
  const n = halves.length;
  if (format === "bf16") {
    const out = new Uint32Array(n);
    for (let i = 0; i < n; i++) out[i] = halves[i] << 16;
    return new Float32Array(out.buffer);
  }
  const table = f16Table();
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = table[halves[i]];
  return out;
}

let f16TableCache: Float32Array | undefined;

/** All 65536 F16 values as F32, built on first use. */
function f16Table(): Float32Array {
  if (f16TableCache) return f16TableCache;
  const t = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = f16ToF32(i);
  return (f16TableCache = t);
}
