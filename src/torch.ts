/**
 * A reader for PyTorch checkpoints (`pytorch_model.bin`, and the shards named
 * by `pytorch_model.bin.index.json`) as `torch.save(state_dict)` writes them:
 * a zip archive holding `<name>/data.pkl`, a pickle of the state dict, and one
 * entry `<name>/data/<key>` per storage.
 *
 * A pickle is a program for a small stack machine that may import and call
 * any Python function, so it is never run as such: {@link readStateDict}
 * understands only the opcodes a state dict needs, and the only names it
 * accepts are torch's storage types, its tensor rebuild functions and
 * `collections.OrderedDict`. Any other name (`os.system`, `builtins.eval`,
 * …) is refused with an error that names it, before anything could run.
 *
 * @module
 */

import { ModelFileError } from "./errors.ts";
import { parseShardIndex } from "./safetensors.ts";
import { bf16ToF32, f16ToF32 } from "./safetensors.ts";
import type { Halves } from "./quant.ts";
import { type ModelSource, readJson } from "./source.ts";
import { type TensorFile, TensorStore } from "./weights.ts";

/** Element types of torch storages, by storage class. */
const STORAGES: Readonly<Record<string, { dtype: string; size: number }>> = {
  FloatStorage: { dtype: "F32", size: 4 },
  HalfStorage: { dtype: "F16", size: 2 },
  BFloat16Storage: { dtype: "BF16", size: 2 },
  DoubleStorage: { dtype: "F64", size: 8 },
  LongStorage: { dtype: "I64", size: 8 },
  IntStorage: { dtype: "I32", size: 4 },
  ShortStorage: { dtype: "I16", size: 2 },
  CharStorage: { dtype: "I8", size: 1 },
  ByteStorage: { dtype: "U8", size: 1 },
  BoolStorage: { dtype: "BOOL", size: 1 },
};

/** The callables a state dict's pickle may name: nothing else is accepted. */
const REBUILD_FUNCTIONS = new Set([
  "torch._utils._rebuild_tensor_v2",
  "torch._utils._rebuild_tensor",
]);
const ORDERED_DICT = "collections.OrderedDict";

/** One tensor of a state dict: a strided view of a storage. */
export interface TorchTensor {
  /** The state dict's key. */
  name: string;
  /** "F32", "F16", "BF16", "F64", or an integer type (not readable as floats). */
  dtype: string;
  /** Dimensions, outermost first. */
  shape: number[];
  /** Elements to step per index of each dimension. */
  stride: number[];
  /** The first element, in elements from the start of the storage. */
  offset: number;
  /** The storage's bytes. */
  storage: Uint8Array;
}

/** A storage named by a pickle's persistent id, before its bytes are found. */
interface StorageRef {
  kind: "storage";
  dtype: string;
  size: number;
  key: string;
  numel: number;
}

/** A name a GLOBAL opcode pushed, once checked against the allow-list. */
interface GlobalRef {
  kind: "global";
  name: string;
}

type PickleValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | PickleValue[]
  | Map<PickleValue, PickleValue>
  | StorageRef
  | GlobalRef
  | TorchTensor;

const MARK = Symbol("mark");

/**
 * Runs the pickle `data` as far as a state dict needs, without executing
 * anything: GLOBAL may only name torch storages, torch's tensor rebuild
 * functions or OrderedDict, and REDUCE may only call the latter two.
 * `storage(key)` gives the bytes of a storage named by a persistent id.
 *
 * @throws {ModelFileError} For any other name, opcode or malformed data.
 */
export function readStateDict(
  data: Uint8Array,
  file: string,
  storage: (key: string) => Uint8Array,
): Map<string, TorchTensor> {
  const fail = (problem: string): never => {
    throw new ModelFileError(file, problem);
  };
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const stack: (PickleValue | typeof MARK)[] = [];
  const memo = new Map<number, PickleValue>();
  let at = 0;
  const take = (count: number): number => {
    if (at + count > data.length) fail(`The pickle ends inside an opcode at byte ${at}`);
    const start = at;
    at += count;
    return start;
  };
  const pop = (): PickleValue => {
    const value = stack.pop();
    if (value === undefined || value === MARK) fail(`The pickle pops an empty stack at byte ${at}`);
    return value as PickleValue;
  };
  const top = (): PickleValue => {
    const value = stack[stack.length - 1];
    if (value === undefined || value === MARK) {
      fail(`The pickle reads an empty stack at byte ${at}`);
    }
    return value as PickleValue;
  };
  const popMark = (): PickleValue[] => {
    const mark = stack.lastIndexOf(MARK);
    if (mark < 0) fail(`The pickle has no mark to pop at byte ${at}`);
    const items = stack.splice(mark) as PickleValue[];
    items.shift();
    return items;
  };
  const text = (length: number): string => {
    const start = take(length);
    try {
      return decoder.decode(data.subarray(start, start + length));
    } catch {
      return fail(`The pickle holds a string that is not UTF-8 at byte ${start}`);
    }
  };
  const global = (module: string, name: string): GlobalRef => {
    const full = `${module}.${name}`;
    const isStorage = module === "torch" && Object.hasOwn(STORAGES, name);
    if (!isStorage && !REBUILD_FUNCTIONS.has(full) && full !== ORDERED_DICT) {
      fail(
        `The pickle names ${full}, which a state dict does not use: refused, nothing was run ` +
          "(only torch storages, torch._utils._rebuild_tensor_v2 and collections.OrderedDict are allowed)",
      );
    }
    return { kind: "global", name: full };
  };
  const setItems = (target: PickleValue, items: PickleValue[]) => {
    if (!(target instanceof Map)) {
      fail(`The pickle sets items on something not a dict at byte ${at}`);
    }
    for (let i = 0; i + 1 < items.length; i += 2) {
      (target as Map<PickleValue, PickleValue>).set(items[i], items[i + 1]);
    }
  };

  while (true) {
    if (at >= data.length) fail("The pickle ends without a STOP opcode");
    const opcode = data[at++];
    switch (opcode) {
      case 0x80: // PROTO
        take(1);
        break;
      case 0x95: // FRAME
        take(8);
        break;
      case 0x2e: { // STOP
        const result = pop();
        if (!(result instanceof Map)) fail("The pickle does not hold a dict of tensors");
        const tensors = new Map<string, TorchTensor>();
        for (const [key, value] of result as Map<PickleValue, PickleValue>) {
          if (typeof key !== "string") fail("The state dict has a key that is not a string");
          if (!isTensor(value)) fail(`The state dict's "${key as string}" is not a tensor`);
          tensors.set(key as string, { ...(value as TorchTensor), name: key as string });
        }
        return tensors;
      }
      case 0x28: // MARK
        stack.push(MARK);
        break;
      case 0x7d: // EMPTY_DICT
        stack.push(new Map());
        break;
      case 0x5d: // EMPTY_LIST
        stack.push([]);
        break;
      case 0x29: // EMPTY_TUPLE
        stack.push([]);
        break;
      case 0x74: // TUPLE
      case 0x6c: // LIST
        stack.push(popMark());
        break;
      case 0x64: { // DICT
        const map = new Map<PickleValue, PickleValue>();
        setItems(map, popMark());
        stack.push(map);
        break;
      }
      case 0x85: // TUPLE1
        stack.push([pop()]);
        break;
      case 0x86: { // TUPLE2
        const b = pop();
        stack.push([pop(), b]);
        break;
      }
      case 0x87: { // TUPLE3
        const c = pop();
        const b = pop();
        stack.push([pop(), b, c]);
        break;
      }
      case 0x61: { // APPEND
        const item = pop();
        const list = top();
        if (!Array.isArray(list)) fail(`The pickle appends to something not a list at byte ${at}`);
        (list as PickleValue[]).push(item);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark();
        const list = top();
        if (!Array.isArray(list)) fail(`The pickle appends to something not a list at byte ${at}`);
        // One at a time: spreading a long run of items as arguments overflows the stack.
        for (const item of items) (list as PickleValue[]).push(item);
        break;
      }
      case 0x73: { // SETITEM
        const value = pop();
        const key = pop();
        setItems(top(), [key, value]);
        break;
      }
      case 0x75: { // SETITEMS
        const items = popMark();
        setItems(top(), items);
        break;
      }
      case 0x71: // BINPUT
        memo.set(data[take(1)], top());
        break;
      case 0x72: // LONG_BINPUT
        memo.set(view.getUint32(take(4), true), top());
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, top());
        break;
      case 0x68: // BINGET
      case 0x6a: { // LONG_BINGET
        const index = opcode === 0x68 ? data[take(1)] : view.getUint32(take(4), true);
        if (!memo.has(index)) fail(`The pickle reads memo ${index}, which was never written`);
        stack.push(memo.get(index) as PickleValue);
        break;
      }
      case 0x4a: // BININT
        stack.push(view.getInt32(take(4), true));
        break;
      case 0x4b: // BININT1
        stack.push(data[take(1)]);
        break;
      case 0x4d: // BININT2
        stack.push(view.getUint16(take(2), true));
        break;
      case 0x8a: { // LONG1
        const length = data[take(1)];
        const start = take(length);
        let value = 0n;
        for (let i = length - 1; i >= 0; i--) value = (value << 8n) | BigInt(data[start + i]);
        if (length > 0 && data[start + length - 1] & 0x80) value -= 1n << BigInt(8 * length);
        const safe = value >= BigInt(Number.MIN_SAFE_INTEGER) &&
          value <= BigInt(Number.MAX_SAFE_INTEGER);
        stack.push(safe ? Number(value) : value);
        break;
      }
      case 0x47: // BINFLOAT (big-endian)
        stack.push(view.getFloat64(take(8), false));
        break;
      case 0x4e: // NONE
        stack.push(null);
        break;
      case 0x88: // NEWTRUE
        stack.push(true);
        break;
      case 0x89: // NEWFALSE
        stack.push(false);
        break;
      case 0x58: // BINUNICODE
      case 0x54: // BINSTRING
        stack.push(text(view.getUint32(take(4), true)));
        break;
      case 0x8c: // SHORT_BINUNICODE
      case 0x55: // SHORT_BINSTRING
        stack.push(text(data[take(1)]));
        break;
      case 0x63: { // GLOBAL: "module\nname\n"
        const end = data.indexOf(0x0a, data.indexOf(0x0a, at) + 1);
        if (end < 0) fail(`The pickle's GLOBAL at byte ${at - 1} is not terminated`);
        const [module, name] = text(end + 1 - at).split("\n");
        stack.push(global(module, name));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== "string" || typeof name !== "string") {
          fail(`The pickle's STACK_GLOBAL at byte ${at - 1} does not name a module and a name`);
        }
        stack.push(global(module as string, name as string));
        break;
      }
      case 0x51: { // BINPERSID: ("storage", storage class, key, location, numel)
        const id = pop();
        if (
          !Array.isArray(id) || id.length !== 5 || id[0] !== "storage" || !isGlobal(id[1]) ||
          typeof id[2] !== "string" || !isCount(id[4])
        ) {
          fail(`The pickle's persistent id at byte ${at - 1} is not a torch storage`);
        }
        const [, storageClass, key, , numel] = id as [string, GlobalRef, string, string, number];
        const type = STORAGES[storageClass.name.replace(/^torch\./, "")];
        if (!type) fail(`The pickle's persistent id names ${storageClass.name}, not a storage`);
        stack.push({ kind: "storage", ...type, key, numel });
        break;
      }
      case 0x52: { // REDUCE
        const args = pop();
        const callable = pop();
        if (!isGlobal(callable) || !Array.isArray(args)) {
          fail(`The pickle's REDUCE at byte ${at - 1} does not call a named function`);
        }
        stack.push(reduce((callable as GlobalRef).name, args as PickleValue[], storage, fail));
        break;
      }
      case 0x62: { // BUILD: a state for the object below; an OrderedDict's attributes are not needed
        pop();
        const target = top();
        if (!(target instanceof Map)) {
          fail(`The pickle's BUILD at byte ${at - 1} targets an object a state dict does not hold`);
        }
        break;
      }
      case 0x30: // POP
        stack.pop();
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        stack.push(top());
        break;
      default:
        fail(
          `The pickle uses opcode 0x${opcode.toString(16).padStart(2, "0")} at byte ${at - 1}, ` +
            "which a state dict does not need: refused",
        );
    }
  }
}

/** Whether `value` is a count or an index: a whole number from 0, exactly representable. */
function isCount(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

function isGlobal(value: unknown): value is GlobalRef {
  return typeof value === "object" && value !== null && (value as GlobalRef).kind === "global";
}

function isTensor(value: unknown): value is TorchTensor {
  return typeof value === "object" && value !== null &&
    (value as TorchTensor).storage instanceof Uint8Array;
}

function isStorage(value: unknown): value is StorageRef {
  return typeof value === "object" && value !== null && (value as StorageRef).kind === "storage";
}

/** The one kind of call a state dict makes: rebuild a tensor, or make an empty OrderedDict. */
function reduce(
  callable: string,
  args: PickleValue[],
  storage: (key: string) => Uint8Array,
  fail: (problem: string) => never,
): PickleValue {
  if (callable === ORDERED_DICT) {
    if (args.length !== 0) {
      fail("The pickle builds an OrderedDict from arguments, which a state dict does not");
    }
    return new Map();
  }
  if (!REBUILD_FUNCTIONS.has(callable)) {
    fail(`The pickle calls ${callable}, which is not a function: refused`);
  }
  const [ref, offset, shape, stride] = args;
  const dims = (value: PickleValue) => Array.isArray(value) && value.every(isCount);
  if (!isStorage(ref) || !isCount(offset) || !dims(shape) || !dims(stride)) {
    return fail(
      `The pickle calls ${callable} with arguments that are not a storage, offset, size and stride`,
    );
  }
  const size = shape as number[];
  const steps = stride as number[];
  if (size.length !== steps.length) {
    fail(`A tensor has ${size.length} sizes but ${steps.length} strides`);
  }
  const bytes = storage(ref.key);
  if (bytes.length < ref.numel * ref.size) {
    fail(
      `Storage ${ref.key} holds ${bytes.length} bytes but names ${ref.numel} elements of ${ref.dtype}`,
    );
  }
  const last = size.some((d) => d === 0)
    ? offset - 1
    : size.reduce((sum, d, i) => sum + (d - 1) * steps[i], offset);
  if (last >= ref.numel) {
    fail(
      `A tensor of size [${
        size.join(", ")
      }] at offset ${offset} reaches past its storage of ${ref.numel} elements`,
    );
  }
  // A state_dict's tensors own their elements; more of them than the storage
  // holds (zero strides) would let a small file make the loader allocate a
  // tensor of any size.
  const elements = size.reduce((product, d) => product * d, 1);
  if (elements > ref.numel) {
    fail(
      `A tensor of size [${
        size.join(", ")
      }] has ${elements} elements, more than its storage's ${ref.numel}`,
    );
  }
  return { name: "", dtype: ref.dtype, shape: size, stride: steps, offset, storage: bytes };
}

/** A `torch.save` zip archive's stored entries, by name. */
function readZip(bytes: Uint8Array, fail: (problem: string) => never): Map<string, Uint8Array> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = (at: number) => view.getUint16(at, true);
  const u32 = (at: number) => view.getUint32(at, true);
  const u64 = (at: number) => {
    const value = view.getBigUint64(at, true);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) fail("A zip field is beyond any file");
    return Number(value);
  };
  const inside = (at: number, length: number, what: string) => {
    if (at < 0 || at + length > bytes.length) {
      fail(`The zip archive's ${what} lies outside the file`);
    }
  };
  let end = -1;
  for (let at = bytes.length - 22; at >= Math.max(0, bytes.length - 22 - 0xffff); at--) {
    if (u32(at) === 0x06054b50) {
      end = at;
      break;
    }
  }
  if (end < 0) fail("Not a zip archive (the format of torch.save): no end of central directory");
  let count = u16(end + 10);
  let directory = u32(end + 16);
  if (count === 0xffff || directory === 0xffffffff) {
    const locator = end - 20;
    inside(locator, 20, "zip64 locator");
    if (u32(locator) !== 0x07064b50) fail("The zip archive's zip64 locator is missing");
    const record = u64(locator + 8);
    inside(record, 56, "zip64 directory record");
    if (u32(record) !== 0x06064b50) fail("The zip archive's zip64 directory record is missing");
    count = u64(record + 32);
    directory = u64(record + 48);
  }
  const entries = new Map<string, Uint8Array>();
  const decoder = new TextDecoder();
  let at = directory;
  for (let i = 0; i < count; i++) {
    inside(at, 46, `directory entry ${i}`);
    if (u32(at) !== 0x02014b50) fail(`The zip archive's directory entry ${i} is malformed`);
    const method = u16(at + 10);
    let compressed = u32(at + 20);
    let size = u32(at + 24);
    const nameLength = u16(at + 28);
    const extraLength = u16(at + 30);
    let local = u32(at + 42);
    inside(at + 46, nameLength + extraLength, `directory entry ${i}`);
    const name = decoder.decode(bytes.subarray(at + 46, at + 46 + nameLength));
    // Zip64 extra field: the 64-bit values of the fields that read 0xffffffff, in this order.
    for (let e = at + 46 + nameLength; e + 4 <= at + 46 + nameLength + extraLength;) {
      const id = u16(e);
      const length = u16(e + 2);
      if (e + 4 + length > at + 46 + nameLength + extraLength) {
        fail(`The zip archive's directory entry ${i} has an extra field past its end`);
      }
      if (id === 0x0001) {
        let field = e + 4;
        // Each value must lie within the field's declared length.
        const next = () => {
          if (field + 8 > e + 4 + length) {
            fail(
              `The zip archive's directory entry ${i} has a zip64 field too short for its values`,
            );
          }
          const value = u64(field);
          field += 8;
          return value;
        };
        if (size === 0xffffffff) size = next();
        if (compressed === 0xffffffff) compressed = next();
        if (local === 0xffffffff) local = next();
      }
      e += 4 + length;
    }
    if (method !== 0 || compressed !== size) {
      fail(
        `The zip entry "${name}" is compressed (method ${method}); torch.save stores entries uncompressed`,
      );
    }
    inside(local, 30, `local header of "${name}"`);
    if (u32(local) !== 0x04034b50) fail(`The zip entry "${name}" has no local header`);
    const start = local + 30 + u16(local + 26) + u16(local + 28);
    inside(start, size, `data of "${name}"`);
    entries.set(name, bytes.subarray(start, start + size));
    at += 46 + nameLength + extraLength + u16(at + 32);
  }
  return entries;
}

/** A parsed `pytorch_model.bin`: its state dict's tensors, validated. */
export class TorchFile implements TensorFile {
  /** The path or URL, for messages. */
  readonly file: string;
  /** Every tensor, by name. */
  readonly tensors: Map<string, TorchTensor>;

  private constructor(file: string, tensors: Map<string, TorchTensor>) {
    this.file = file;
    this.tensors = tensors;
  }

  /**
   * Parses a `torch.save` archive held in memory (see the module
   * documentation for what is accepted).
   *
   * @throws {ModelFileError} For a malformed archive, a refused pickle or a tensor outside its storage.
   */
  static parse(bytes: Uint8Array, file: string): TorchFile {
    const fail = (problem: string): never => {
      throw new ModelFileError(file, problem);
    };
    const entries = readZip(bytes, fail);
    const pickle = [...entries.keys()].find((name) => /^[^/]+\/data\.pkl$/.test(name));
    if (!pickle) fail("The archive has no <name>/data.pkl: not a torch.save checkpoint");
    const prefix = (pickle as string).slice(0, -"data.pkl".length);
    const order = entries.get(`${prefix}byteorder`);
    if (order && new TextDecoder().decode(order) !== "little") {
      fail(`The checkpoint was saved big-endian (byteorder "${new TextDecoder().decode(order)}")`);
    }
    const tensors = readStateDict(entries.get(pickle as string) as Uint8Array, file, (key) => {
      const data = entries.get(`${prefix}data/${key}`);
      if (!data) fail(`The archive has no storage "${prefix}data/${key}"`);
      return data as Uint8Array;
    });
    return new TorchFile(file, tensors);
  }

  /** A tensor's shape; a missing one is a {@link ModelFileError}. */
  info(name: string): TorchTensor {
    const tensor = this.tensors.get(name);
    if (!tensor) throw new ModelFileError(this.file, `Missing tensor "${name}"`);
    return tensor;
  }

  /**
   * A tensor's values as float32 in row-major order (F32, F16, BF16 or F64),
   * always a new array (the archive's bytes are not kept).
   *
   * @throws {ModelFileError} For an integer tensor.
   */
  float32(name: string): Float32Array {
    const { dtype, storage } = this.info(name);
    const view = new DataView(storage.buffer, storage.byteOffset, storage.byteLength);
    const read: ((element: number) => number) | undefined = {
      F32: (e: number) => view.getFloat32(4 * e, true),
      F16: (e: number) => f16ToF32(view.getUint16(2 * e, true)),
      BF16: (e: number) => bf16ToF32(view.getUint16(2 * e, true)),
      F64: (e: number) => view.getFloat64(8 * e, true),
    }[dtype];
    if (!read) throw new ModelFileError(this.file, `Tensor "${name}" holds ${dtype}, not floats`);
    return this.#rowMajor(name, new Float32Array(this.#size(name)), read);
  }

  /**
   * An F16 or BF16 tensor's 16-bit values in row-major order, always a new
   * array; null for any other dtype.
   */
  halves(name: string): Halves | null {
    const { dtype, storage } = this.info(name);
    if (dtype !== "F16" && dtype !== "BF16") return null;
    const view = new DataView(storage.buffer, storage.byteOffset, storage.byteLength);
    return {
      format: dtype === "F16" ? "f16" : "bf16",
      halves: this.#rowMajor(
        name,
        new Uint16Array(this.#size(name)),
        (e) => view.getUint16(2 * e, true),
      ),
    };
  }

  #size(name: string): number {
    return this.info(name).shape.reduce((a, b) => a * b, 1);
  }

  /** `out` filled with tensor `name`'s elements in row-major order, each as `read` gives it. */
  #rowMajor<T extends Float32Array | Uint16Array>(
    name: string,
    out: T,
    read: (element: number) => number,
  ): T {
    const { shape, stride, offset } = this.info(name);
    const index = new Array(shape.length).fill(0);
    let element = offset;
    for (let i = 0; i < out.length; i++) {
      out[i] = read(element);
      // Step the last index, carrying into the ones before it.
      for (let d = shape.length - 1; d >= 0; d--) {
        index[d]++;
        element += stride[d];
        if (index[d] < shape[d]) break;
        element -= stride[d] * shape[d];
        index[d] = 0;
      }
    }
    return out;
  }
}

const INDEX = "pytorch_model.bin.index.json";
const SINGLE = "pytorch_model.bin";

/** Whether a model directory holds PyTorch weights (one file or an index of shards). */
export async function hasTorchWeights(dir: ModelSource): Promise<boolean> {
  return await dir.exists(INDEX) || await dir.exists(SINGLE);
}

/** The tensors of a directory's `pytorch_model.bin` or of the shards its index names. */
export async function readTorchWeights(dir: ModelSource): Promise<TensorStore> {
  const names = await dir.exists(INDEX)
    ? new Set(parseShardIndex(await readJson(dir, INDEX), dir.describe(INDEX)).values())
    : [SINGLE];
  const files: TorchFile[] = [];
  for (const name of names) {
    files.push(TorchFile.parse(await dir.readBytes(name), dir.describe(name)));
  }
  return new TensorStore(files);
}
