import { assert, assertEquals, assertStringIncludes, assertThrows } from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import {
  bf16AsF16,
  bf16ToF32,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
  parseShardIndex,
  SafetensorsFile,
  writeSafetensors,
} from "../src/safetensors.ts";
import { SHARED } from "./helpers.ts";

const TINY_F32 = `${SHARED}/fixtures/hf-oracle/tiny-f32/model.safetensors`;
const TINY_F32_EXPECTED = `${SHARED}/fixtures/hf-oracle/tiny-f32/expected.safetensors`;
const ODD_BF16 = `${SHARED}/fixtures/hf-oracle/odd-bf16/model.safetensors`;
const SHAKESPEARE_F16 = `${SHARED}/models/tiny-shakespeare/model.safetensors`;

const FILE = "bad.safetensors";

/** Builds a file from a header (object or raw JSON text) and `dataBytes` data bytes. */
function rawFile(header: unknown, data: number | Uint8Array = 0): Uint8Array {
  const text = typeof header === "string" ? header : JSON.stringify(header);
  const h = new TextEncoder().encode(text);
  const d = typeof data === "number" ? new Uint8Array(data) : data;
  const out = new Uint8Array(8 + h.length + d.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.length), true);
  out.set(h, 8);
  out.set(d, 8 + h.length);
  return out;
}

/** Asserts that `fn` throws a ModelFileError naming `file` and containing `fragment`. */
function assertModelFileError(fn: () => unknown, fragment: string, file = FILE): ModelFileError {
  const e = assertThrows(fn, ModelFileError);
  assertStringIncludes(e.message, file);
  assertStringIncludes(e.message, fragment);
  assertEquals(e.file, file);
  return e;
}

function parseBad(header: unknown, data: number | Uint8Array = 0): SafetensorsFile {
  return SafetensorsFile.parse(rawFile(header, data), FILE);
}

function assertAllFinite(a: Float32Array, what: string): void {
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i])) throw new Error(`${what}[${i}] = ${a[i]} is not finite`);
  }
}

function rawU16(st: SafetensorsFile, name: string): Uint16Array {
  const info = st.info(name);
  const copy = st.bytes.slice(info.byteOffset, info.byteOffset + info.byteLength);
  return new Uint16Array(copy.buffer);
}

// ---------------------------------------------------------------------------
// Round trips.

Deno.test("writeSafetensors → parse round-trips F32 exactly, with metadata", () => {
  const data = new Float32Array([0, -0, 1.5, -3.25e-20, 3.4e38, Infinity, -Infinity, NaN]);
  const bytes = writeSafetensors(
    { "layer.weight": { dtype: "F32", shape: [2, 4], data } },
    { format: "pt", note: "hi" },
  );
  const st = SafetensorsFile.parse(bytes, "rt.safetensors");
  assertEquals(st.metadata, { format: "pt", note: "hi" });
  const info = st.info("layer.weight");
  assertEquals(info.dtype, "F32");
  assertEquals(info.shape, [2, 4]);
  assertEquals(info.byteLength, 32);
  assertEquals(info.byteOffset % 8, 0);
  assertEquals(Array.from(st.float32("layer.weight")), Array.from(data));
  assert(Object.is(st.float32("layer.weight")[1], -0));
});

Deno.test("writeSafetensors → parse round-trips F16 (exact values and round-to-nearest-even)", () => {
  const exact = [0, -0, 1, -2.5, 65504, -65504, 2 ** -24, 2 ** -14, 1023 * 2 ** -24, Infinity];
  const rounded = [
    [1 + 2 ** -11, 1], // tie → even (down)
    [1 + 3 * 2 ** -11, 1 + 2 ** -9], // tie → even (up)
    [65519, 65504], // just below the overflow midpoint
    [65520, Infinity], // overflow midpoint ties to even = infinity
    [2 ** -25, 0], // half the smallest subnormal ties to zero
    [3 * 2 ** -26, 2 ** -24], // above half rounds up
    [1e-10, 0],
  ];
  const input = new Float32Array([...exact, ...rounded.map((r) => r[0]), NaN]);
  const bytes = writeSafetensors({ h: { dtype: "F16", shape: [input.length], data: input } });
  const st = SafetensorsFile.parse(bytes, "rt.safetensors");
  assertEquals(st.info("h").dtype, "F16");
  assertEquals(st.info("h").byteLength, input.length * 2);
  const out = Array.from(st.float32("h"));
  assertEquals(out.slice(0, exact.length), exact);
  assert(Object.is(out[1], -0));
  assertEquals(out.slice(exact.length, -1), rounded.map((r) => r[1]));
  assert(Number.isNaN(out[out.length - 1]));
});

Deno.test("writeSafetensors → parse round-trips BF16 (round-to-nearest-even)", () => {
  const exact = [0, -0, 1, -2.5, 3.3895313892515355e38, 2 ** -133, 2 ** -126, -Infinity];
  const rounded = [
    [1 + 2 ** -8, 1], // tie → even (down)
    [1 + 3 * 2 ** -8, 1 + 2 ** -6], // tie → even (up)
    [1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -7], // above half
    [3.4e38, Infinity], // above the overflow midpoint
  ];
  const input = new Float32Array([...exact, ...rounded.map((r) => r[0]), NaN]);
  const bytes = writeSafetensors({ b: { dtype: "BF16", shape: [1, input.length], data: input } });
  const st = SafetensorsFile.parse(bytes, "rt.safetensors");
  assertEquals(st.info("b").dtype, "BF16");
  assertEquals(st.info("b").shape, [1, input.length]);
  const out = Array.from(st.float32("b"));
  assertEquals(out.slice(0, exact.length), exact);
  assert(Object.is(out[1], -0));
  assertEquals(out.slice(exact.length, -1), rounded.map((r) => r[1]));
  assert(Number.isNaN(out[out.length - 1]));
});

Deno.test("writeSafetensors → parse round-trips I32, scalars, empty tensors, mixed dtypes", () => {
  const ids = new Int32Array([0, 1, -1, 2147483647, -2147483648, 42]);
  const bytes = writeSafetensors({
    half: { dtype: "F16", shape: [3], data: new Float32Array([1, 2, 3]) },
    ids: { dtype: "I32", shape: [2, 3], data: ids },
    scalar: { dtype: "F32", shape: [], data: new Float32Array([7]) },
    empty: { dtype: "F32", shape: [0, 5], data: new Float32Array(0) },
  });
  // Data section starts at a multiple of 8 and the header is space-padded.
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assertEquals((8 + n) % 8, 0);
  const st = SafetensorsFile.parse(bytes, "rt.safetensors");
  assertEquals(st.metadata, {});
  assertEquals(st.tensors.size, 4);
  assertEquals(st.info("ids").dtype, "I32");
  assertEquals(Array.from(st.int32("ids")), Array.from(ids));
  assertEquals(st.info("scalar").shape, []);
  assertEquals(Array.from(st.float32("scalar")), [7]);
  assertEquals(st.float32("empty").length, 0);
  assertEquals(Array.from(st.float32("half")), [1, 2, 3]);
  // Every tensor is aligned to its element size (4-byte ones are placed first).
  for (const info of st.tensors.values()) {
    const size = info.dtype === "F16" ? 2 : 4;
    assertEquals(info.byteOffset % size, 0, info.name);
  }
});

Deno.test("writeSafetensors rejects data that does not match dtype or shape", () => {
  assertThrows(
    () => writeSafetensors({ a: { dtype: "I32", shape: [1], data: new Float32Array(1) } }),
    TypeError,
  );
  assertThrows(
    () => writeSafetensors({ a: { dtype: "F32", shape: [2, 2], data: new Float32Array(3) } }),
    RangeError,
  );
  assertThrows(
    () => writeSafetensors({ a: { dtype: "F32", shape: [-1], data: new Float32Array(0) } }),
    RangeError,
  );
});

Deno.test("parse reads F64, I64, I16, I8, U8 and BOOL tensors from a hand-built file", () => {
  const data = new Uint8Array(16 + 16 + 4 + 2 + 2 + 2);
  const dv = new DataView(data.buffer);
  dv.setFloat64(0, 1 / 3, true);
  dv.setFloat64(8, -1e300, true);
  dv.setBigInt64(16, -5n, true);
  dv.setBigInt64(24, 2147483647n, true);
  dv.setInt16(32, -2, true);
  const st = parseBad({
    d: { dtype: "F64", shape: [2], data_offsets: [0, 16] },
    l: { dtype: "I64", shape: [2], data_offsets: [16, 32] },
    s: { dtype: "I16", shape: [2], data_offsets: [32, 36] },
    b: { dtype: "I8", shape: [2], data_offsets: [36, 38] },
    u: { dtype: "U8", shape: [2], data_offsets: [38, 40] },
    z: { dtype: "BOOL", shape: [1, 2], data_offsets: [40, 42] },
  }, data);
  assertEquals(Array.from(st.float32("d")), [Math.fround(1 / 3), -Infinity]);
  assertEquals(Array.from(st.int32("l")), [-5, 2147483647]);
  assertEquals(st.info("z").dtype, "BOOL");
  assertEquals(st.info("s").byteLength, 4);
  assert(st.has("u"));
  assert(!st.has("nope"));
});

Deno.test("float32 is a zero-copy view when aligned and a correct copy when not", () => {
  const bytes = writeSafetensors({
    w: { dtype: "F32", shape: [3], data: new Float32Array([1, 2, 3]) },
  });
  const aligned = SafetensorsFile.parse(bytes, "a.safetensors");
  assert(aligned.float32("w").buffer === bytes.buffer);

  const shifted = new Uint8Array(bytes.length + 1);
  shifted.set(bytes, 1);
  const view = shifted.subarray(1);
  const st = SafetensorsFile.parse(view, "u.safetensors");
  const w = st.float32("w");
  assert(w.buffer !== shifted.buffer);
  assertEquals(Array.from(w), [1, 2, 3]);
});

// ---------------------------------------------------------------------------
// Scalar conversions.

Deno.test("f16ToF32/f32ToF16 are exact inverses over all 65536 F16 patterns", () => {
  for (let b = 0; b < 65536; b++) {
    const v = f16ToF32(b);
    if ((b & 0x7c00) === 0x7c00 && (b & 0x3ff) !== 0) {
      assert(Number.isNaN(v));
      assertEquals(f32ToF16(v), 0x7e00);
      continue;
    }
    if (f32ToF16(v) !== b) throw new Error(`F16 ${b.toString(16)} → ${v} → ${f32ToF16(v)}`);
  }
  assertEquals(f16ToF32(0x0001), 2 ** -24);
  assertEquals(f16ToF32(0x03ff), 1023 * 2 ** -24);
  assertEquals(f16ToF32(0x7bff), 65504);
  assertEquals(f16ToF32(0xfc00), -Infinity);
  assert(Object.is(f16ToF32(0x8000), -0));
  // No double rounding through F32: this double is just above an F16 tie.
  assertEquals(f32ToF16(1 + 2 ** -11 + 2 ** -40), 0x3c01);
});

Deno.test("bf16ToF32/f32ToBf16 are exact inverses over all 65536 BF16 patterns", () => {
  for (let b = 0; b < 65536; b++) {
    const v = bf16ToF32(b);
    if ((b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0) {
      assert(Number.isNaN(v));
      assertEquals(f32ToBf16(v), 0x7fc0);
      continue;
    }
    if (f32ToBf16(v) !== b) throw new Error(`BF16 ${b.toString(16)} → ${v} → ${f32ToBf16(v)}`);
  }
  assertEquals(bf16ToF32(0x3f80), 1);
  assertEquals(bf16ToF32(0x0001), 2 ** -133);
  assertEquals(f32ToBf16(1 + 2 ** -8 + 2 ** -40), 0x3f81);
});

Deno.test("the writer's F16/BF16 rounding agrees with f32ToF16/f32ToBf16 on random F32 bit patterns", () => {
  const n = 200_000;
  const bits = new Uint32Array(n);
  let seed = 12345;
  for (let i = 0; i < n; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    const hi = seed;
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    bits[i] = ((hi & 0xffff0000) | (seed >>> 16)) >>> 0;
  }
  // Concentrate half of them in F16's subnormal/normal/overflow exponent range.
  for (let i = 0; i < n; i += 2) bits[i] = (bits[i] & 0x807fffff) | ((95 + (i % 50)) << 23);
  const data = new Float32Array(bits.buffer);
  const st = SafetensorsFile.parse(
    writeSafetensors({
      h: { dtype: "F16", shape: [n], data },
      b: { dtype: "BF16", shape: [n], data },
    }),
    "rand.safetensors",
  );
  const h = rawU16(st, "h"), b = rawU16(st, "b");
  for (let i = 0; i < n; i++) {
    const x = data[i];
    if (Number.isNaN(x)) {
      assert(Number.isNaN(f16ToF32(h[i])) && Number.isNaN(bf16ToF32(b[i])));
      continue;
    }
    if (h[i] !== f32ToF16(x)) {
      throw new Error(`F16 of ${x}: writer ${h[i]}, f32ToF16 ${f32ToF16(x)}`);
    }
    if (b[i] !== f32ToBf16(x)) {
      throw new Error(`BF16 of ${x}: writer ${b[i]}, f32ToBf16 ${f32ToBf16(x)}`);
    }
  }
});

// ---------------------------------------------------------------------------
// Real files.

Deno.test("reads the F32 HF checkpoint tiny-f32 (tied lm_head)", async () => {
  const st = SafetensorsFile.parse(await Deno.readFile(TINY_F32), TINY_F32);
  assertEquals(st.metadata, { format: "pt" });
  assertEquals(st.tensors.size, 22);
  assert(!st.has("lm_head.weight"));
  for (const info of st.tensors.values()) {
    assertEquals(info.dtype, "F32", info.name);
    assertEquals(info.byteOffset % 4, 0, info.name);
    assertAllFinite(st.float32(info.name), info.name);
  }
  assertEquals(st.info("backbone.embeddings.weight").shape, [256, 64]);
  assertEquals(st.info("backbone.layers.0.mixer.A_log").shape, [128, 16]);
  assertEquals(st.info("backbone.layers.1.mixer.conv1d.weight").shape, [128, 1, 4]);
  assertEquals(st.info("backbone.norm_f.weight").shape, [64]);
  const emb = st.float32("backbone.embeddings.weight");
  assert(emb.buffer === st.bytes.buffer, "aligned F32 should be a zero-copy view");
  assertEquals(emb.length, 256 * 64);
});

Deno.test("reads the BF16 HF checkpoint odd-bf16 (separate lm_head)", async () => {
  const st = SafetensorsFile.parse(await Deno.readFile(ODD_BF16), ODD_BF16);
  assertEquals(st.metadata, { format: "pt" });
  assertEquals(st.tensors.size, 39);
  for (const info of st.tensors.values()) {
    assertEquals(info.dtype, "BF16", info.name);
    assertAllFinite(st.float32(info.name), info.name);
  }
  assertEquals(st.info("backbone.embeddings.weight").shape, [1000, 48]);
  assertEquals(st.info("lm_head.weight").shape, [1000, 48]);
  assertEquals(st.info("backbone.layers.2.mixer.x_proj.weight").shape, [21, 96]);
  assertEquals(st.info("backbone.layers.0.mixer.conv1d.weight").shape, [96, 1, 3]);
  const raw = rawU16(st, "lm_head.weight");
  const f = st.float32("lm_head.weight");
  for (let i = 0; i < raw.length; i += 97) assertEquals(f[i], bf16ToF32(raw[i]));
});

Deno.test("reads the F16 tiny-shakespeare model", async () => {
  const st = SafetensorsFile.parse(await Deno.readFile(SHAKESPEARE_F16), SHAKESPEARE_F16);
  assertEquals(st.metadata, { format: "pt" });
  assertEquals(st.tensors.size, 62);
  for (const info of st.tensors.values()) {
    assertEquals(info.dtype, "F16", info.name);
    assertAllFinite(st.float32(info.name), info.name);
  }
  assertEquals(st.info("backbone.embeddings.weight").shape, [2048, 256]);
  assertEquals(st.info("backbone.layers.5.mixer.in_proj.weight").shape, [1024, 256]);
  assert(!st.has("backbone.layers.6.norm.weight"));
  const raw = rawU16(st, "backbone.embeddings.weight");
  const f = st.float32("backbone.embeddings.weight");
  for (let i = 0; i < raw.length; i += 101) assertEquals(f[i], f16ToF32(raw[i]));
});

Deno.test("reads expected.safetensors with I32 input_ids and F32 logits", async () => {
  const st = SafetensorsFile.parse(await Deno.readFile(TINY_F32_EXPECTED), TINY_F32_EXPECTED);
  assertEquals(st.metadata, {});
  assertEquals(st.info("input_ids").dtype, "I32");
  assertEquals(st.info("input_ids").shape, [1, 37]);
  assertEquals(st.info("greedy_ids").shape, [1, 53]);
  assertEquals(st.info("logits").dtype, "F32");
  assertEquals(st.info("logits").shape, [1, 37, 256]);
  const ids = st.int32("input_ids");
  assertEquals(ids.length, 37);
  for (const id of ids) assert(id >= 0 && id < 256, `id ${id}`);
  // The prompt is a prefix of the greedy continuation.
  assertEquals(Array.from(st.int32("greedy_ids").subarray(0, 37)), Array.from(ids));
  assertAllFinite(st.float32("logits"), "logits");
});

// ---------------------------------------------------------------------------
// Bad input.

Deno.test("rejects a file shorter than the 8-byte header length", () => {
  assertModelFileError(
    () => SafetensorsFile.parse(new Uint8Array(5), FILE),
    "File is 5 bytes, too short for the 8-byte header length",
  );
});

Deno.test("rejects a header length that runs past the end of the file", () => {
  const bytes = new Uint8Array(120);
  new DataView(bytes.buffer).setBigUint64(0, 9999n, true);
  assertModelFileError(
    () => SafetensorsFile.parse(bytes, FILE),
    "Header length 9999 runs past the end of the file (120 bytes)",
  );
});

Deno.test("rejects a huge u64 header length without converting it unsafely", () => {
  const bytes = new Uint8Array(64);
  new DataView(bytes.buffer).setBigUint64(0, 0xffff_ffff_ffff_ffffn, true);
  assertModelFileError(
    () => SafetensorsFile.parse(bytes, FILE),
    "Header length 18446744073709551615 is absurdly large",
  );
  new DataView(bytes.buffer).setBigUint64(0, 200_000_000n, true);
  assertModelFileError(() => SafetensorsFile.parse(bytes, FILE), "absurdly large");
});

Deno.test("rejects a header that is not valid JSON", () => {
  assertModelFileError(() => parseBad('{"a": {"dtype": "F32",'), "Header is not valid JSON: ");
  assertModelFileError(() => parseBad(""), "Header is not valid JSON: ");
});

Deno.test("rejects a header that is not valid UTF-8", () => {
  const bytes = rawFile("{}   ");
  bytes[9] = 0xff;
  assertModelFileError(() => SafetensorsFile.parse(bytes, FILE), "Header is not valid UTF-8");
});

Deno.test("rejects a header that is not a JSON object", () => {
  assertModelFileError(() => parseBad("[1, 2]"), "Header is not a JSON object (found an array)");
  assertModelFileError(() => parseBad("null"), "Header is not a JSON object (found null)");
  assertModelFileError(() => parseBad('"x"'), "Header is not a JSON object (found a string)");
});

Deno.test("rejects an unknown dtype", () => {
  assertModelFileError(
    () => parseBad({ "a.weight": { dtype: "F8_E9", shape: [1], data_offsets: [0, 1] } }, 1),
    'Tensor "a.weight" has unknown dtype "F8_E9"',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: 4, shape: [1], data_offsets: [0, 1] } }, 1),
    'Tensor "a" dtype is a number, not a string',
  );
});

Deno.test("rejects a tensor entry with missing fields", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [1] } }, 4),
    'Tensor "a" is missing "data_offsets"',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", data_offsets: [0, 4] } }, 4),
    'Tensor "a" is missing "shape"',
  );
  assertModelFileError(() => parseBad({ a: [1, 2] }, 4), 'Tensor "a" entry is not an object');
});

Deno.test("rejects data_offsets that run past the end of the data section", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [5], data_offsets: [10, 30] } }, 20),
    'Tensor "a" data_offsets [10, 30] run past the end of the data section (20 bytes)',
  );
});

Deno.test("rejects negative, fractional or malformed data_offsets", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "U8", shape: [4], data_offsets: [-2, 2] } }, 8),
    'Tensor "a" has invalid data_offsets [-2, 2]',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: "U8", shape: [1], data_offsets: [0.5, 1.5] } }, 8),
    'Tensor "a" has invalid data_offsets [0.5, 1.5]',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: "U8", shape: [1], data_offsets: [0, 1, 2] } }, 8),
    'Tensor "a" data_offsets must be an array of two integers',
  );
});

Deno.test("rejects data_offsets whose begin is after their end", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [0], data_offsets: [8, 4] } }, 16),
    'Tensor "a" data_offsets [8, 4] have begin > end',
  );
});

Deno.test("rejects overlapping tensors", () => {
  assertModelFileError(
    () =>
      parseBad({
        a: { dtype: "F32", shape: [4], data_offsets: [0, 16] },
        b: { dtype: "F32", shape: [4], data_offsets: [8, 24] },
      }, 24),
    'Tensors "a" and "b" overlap in the data section',
  );
  // Empty tensors occupy no bytes and never overlap.
  const st = parseBad({
    a: { dtype: "F32", shape: [4], data_offsets: [0, 16] },
    e: { dtype: "F32", shape: [0], data_offsets: [8, 8] },
  }, 16);
  assertEquals(st.tensors.size, 2);
});

Deno.test("rejects a byte size that contradicts shape and dtype", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [2, 2], data_offsets: [0, 12] } }, 16),
    'Tensor "a" holds 12 bytes but dtype F32 and shape [2, 2] need 16',
  );
  // An absurd shape whose size overflows doubles is still compared exactly.
  assertModelFileError(
    () => parseBad({ a: { dtype: "F64", shape: [2 ** 52, 2 ** 52], data_offsets: [0, 8] } }, 8),
    "need 162259276829213363391578010288128",
  );
});

Deno.test("rejects a negative or fractional shape dimension", () => {
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [2, -1], data_offsets: [0, 0] } }, 8),
    'Tensor "a" has invalid shape dimension -1 in [2, -1]',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: [1.5], data_offsets: [0, 0] } }, 8),
    'Tensor "a" has invalid shape dimension 1.5',
  );
  assertModelFileError(
    () => parseBad({ a: { dtype: "F32", shape: "2x2", data_offsets: [0, 0] } }, 8),
    'Tensor "a" shape is a string, not an array',
  );
});

Deno.test("looking up a missing tensor names it and lists some that exist", () => {
  const st = parseBad({
    "x.weight": { dtype: "F32", shape: [1], data_offsets: [0, 4] },
    "y.bias": { dtype: "F32", shape: [1], data_offsets: [4, 8] },
  }, 8);
  const e = assertModelFileError(() => st.info("z.weight"), 'Missing tensor "z.weight"');
  assertStringIncludes(e.message, '"x.weight", "y.bias"');
  assertModelFileError(() => st.float32("z.weight"), 'Missing tensor "z.weight"');
  assertModelFileError(() => st.int32("z.weight"), 'Missing tensor "z.weight"');
});

Deno.test("rejects non-string __metadata__ values and non-object __metadata__", () => {
  assertModelFileError(
    () => parseBad({ __metadata__: { format: "pt", step: 3 } }),
    '__metadata__ value for key "step" is a number, expected a string',
  );
  assertModelFileError(
    () => parseBad({ __metadata__: ["pt"] }),
    "__metadata__ is an array, expected an object of strings",
  );
});

Deno.test("float32() and int32() reject tensors of the wrong dtype", () => {
  const st = parseBad({
    i: { dtype: "I32", shape: [1], data_offsets: [0, 4] },
    f: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
    u: { dtype: "U8", shape: [1], data_offsets: [8, 9] },
  }, 9);
  assertModelFileError(
    () => st.float32("i"),
    'Tensor "i" has dtype I32, expected a floating-point dtype',
  );
  assertModelFileError(() => st.float32("u"), 'Tensor "u" has dtype U8');
  assertModelFileError(() => st.int32("f"), 'Tensor "f" has dtype F32, expected an integer dtype');
});

Deno.test("int32() rejects I64 values outside the 32-bit range", () => {
  const data = new Uint8Array(16);
  new DataView(data.buffer).setBigInt64(8, 5_000_000_000n, true);
  const st = parseBad({ l: { dtype: "I64", shape: [2], data_offsets: [0, 16] } }, data);
  assertModelFileError(() => st.int32("l"), 'Tensor "l" (I64) value 5000000000 at index 1');
});

// ---------------------------------------------------------------------------
// Shard index.

Deno.test("parseShardIndex maps tensors to shard files", () => {
  const m = parseShardIndex({
    metadata: { total_size: 123 },
    weight_map: {
      "a.weight": "model-00001-of-00002.safetensors",
      "b.weight": "model-00002-of-00002.safetensors",
    },
  }, "model.safetensors.index.json");
  assertEquals(m.get("b.weight"), "model-00002-of-00002.safetensors");
  assertEquals(m.size, 2);
});

Deno.test("parseShardIndex rejects an index that is not an object", () => {
  const f = "model.safetensors.index.json";
  assertModelFileError(() => parseShardIndex([1], f), "Shard index is an array", f);
  assertModelFileError(() => parseShardIndex(null, f), "Shard index is null", f);
});

Deno.test("parseShardIndex rejects a missing or malformed weight_map", () => {
  const f = "model.safetensors.index.json";
  assertModelFileError(() => parseShardIndex({ metadata: {} }, f), 'has no "weight_map"', f);
  assertModelFileError(
    () => parseShardIndex({ weight_map: "x" }, f),
    '"weight_map" is a string, expected an object',
    f,
  );
  assertModelFileError(
    () => parseShardIndex({ weight_map: { a: 3 } }, f),
    'maps tensor "a" to a number',
    f,
  );
  assertModelFileError(() => parseShardIndex({ weight_map: {} }, f), '"weight_map" is empty', f);
});

Deno.test("parseShardIndex rejects shard names that are not plain file names", () => {
  const f = "model.safetensors.index.json";
  for (const bad of ["../secret.safetensors", "sub/x.safetensors", "..", "a\\b", ""]) {
    assertModelFileError(
      () => parseShardIndex({ weight_map: { w: bad } }, f),
      "which is not a plain file name",
      f,
    );
  }
});

// ---------------------------------------------------------------------------
// The format's reference rules (issue #18, item 2).

Deno.test("rejects a header length 1 to 7 bytes short that lands in the header's trailing spaces", () => {
  const good = writeSafetensors({
    "w": { dtype: "F32", shape: [2], data: new Float32Array([1, 2]) },
  });
  const headerLength = Number(new DataView(good.buffer).getBigUint64(0, true));
  const text = new TextDecoder().decode(good.subarray(8, 8 + headerLength));
  // Pad the header with 8 spaces so that shortening it keeps valid JSON.
  const padded = rawFile(text + " ".repeat(8), good.subarray(8 + headerLength));
  SafetensorsFile.parse(padded, FILE);
  for (let short = 1; short <= 7; short++) {
    const bytes = padded.slice();
    new DataView(bytes.buffer).setBigUint64(0, BigInt(headerLength + 8 - short), true);
    assertModelFileError(() => SafetensorsFile.parse(bytes, FILE), `${short} bytes after the last`);
  }
});

Deno.test("rejects a gap between tensors and bytes after the last tensor", () => {
  const entry = (begin: number, end: number) => ({
    dtype: "U8",
    shape: [end - begin],
    data_offsets: [begin, end],
  });
  assertModelFileError(() => parseBad({ a: entry(0, 2), b: entry(3, 4) }, 4), "gap of 1 bytes");
  assertModelFileError(() => parseBad({ a: entry(1, 2) }, 2), "gap of 1 bytes");
  assertModelFileError(() => parseBad({ a: entry(0, 2) }, 5), "3 bytes after the last tensor");
  assertModelFileError(() => parseBad({}, 1), "1 bytes after the last tensor");
  // Order in the header does not matter; coverage does.
  assertEquals(parseBad({ b: entry(2, 4), a: entry(0, 2) }, 4).tensors.size, 2);
});

Deno.test("rejects duplicate tensor names, also when written with escapes", () => {
  const entry = `{"dtype":"U8","shape":[1],"data_offsets":[0,1]}`;
  assertModelFileError(() => parseBad(`{"a":${entry},"a":${entry}}`, 1), "more than once");
  assertModelFileError(() => parseBad(`{"a":${entry},"\\u0061":${entry}}`, 1), "more than once");
  // The same key inside nested objects is not a duplicate.
  const meta = `"__metadata__":{"a":"x"}`;
  assertEquals(parseBad(`{${meta},"a":${entry}}`, 1).metadata, { a: "x" });
});

Deno.test("rejects a tensor name holding a lone UTF-16 surrogate", () => {
  const entry = `{"dtype":"U8","shape":[1],"data_offsets":[0,1]}`;
  assertModelFileError(() => parseBad(`{"a\\ud800":${entry}}`, 1), "lone UTF-16 surrogate");
  assertModelFileError(() => parseBad(`{"\\udc00b":${entry}}`, 1), "lone UTF-16 surrogate");
  assert(parseBad(`{"\\ud83d\\ude00":${entry}}`, 1).has("😀"));
});

Deno.test("rejects a header of one million entries quickly and parses one of 100,000", () => {
  const header = (n: number) => {
    const parts: string[] = [];
    for (let i = 0; i < n; i++) {
      parts.push(`"t${i}":{"dtype":"U8","shape":[1],"data_offsets":[${i},${i + 1}]}`);
    }
    return rawFile(`{${parts.join(",")}}`, n);
  };
  const huge = header(1_000_000);
  let start = performance.now();
  assertModelFileError(() => SafetensorsFile.parse(huge, FILE), "more than 100000 entries");
  let ms = performance.now() - start;
  // Well under 1 s on the reference machine; the bound leaves room for a loaded runner.
  assert(ms < 2000, `rejecting took ${ms.toFixed(0)} ms`);
  const large = header(100_000);
  start = performance.now();
  assertEquals(SafetensorsFile.parse(large, FILE).tensors.size, 100_000);
  ms = performance.now() - start;
  assert(ms < 2000, `parsing took ${ms.toFixed(0)} ms`);
});

Deno.test("parseHeader checks a header from the file's first bytes and its length", () => {
  const bytes = writeSafetensors({
    "w": { dtype: "F32", shape: [4], data: new Float32Array(4) },
  });
  const headerEnd = bytes.length - 16;
  const st = SafetensorsFile.parseHeader(bytes.subarray(0, headerEnd), bytes.length, FILE);
  assertEquals(st.info("w").shape, [4]);
  assertModelFileError(
    () => SafetensorsFile.parseHeader(bytes.subarray(0, headerEnd), bytes.length + 4, FILE),
    "4 bytes after the last tensor",
  );
});

Deno.test("bf16AsF16: BF16 values that are all exact f16 become their f16 patterns, else null", () => {
  const values = [0, -0, 1, -2.5, 0.15625, 65280, 2 ** -14, 2 ** -20];
  const bf16 = Uint16Array.from(values, (v) => f32ToBf16(v));
  const f16 = bf16AsF16(bf16);
  assert(f16 !== null);
  assertEquals(f16.length, values.length, "an even length, unpadded");
  assertEquals([...f16].map(f16ToF32), values.map((v) => bf16ToF32(f32ToBf16(v))));
  assertEquals(Object.is(f16ToF32(f16[1]), -0), true, "-0 stays -0");
  // An odd count gets a zero after it.
  assertEquals([...bf16AsF16(bf16.subarray(0, 3))!], [...f16.subarray(0, 3), 0]);
  // Below f16's subnormals, past its largest value, or with more bits than its subnormals keep.
  for (const v of [2 ** -30, 1e20, 3 * 2 ** -24 + 2 ** -30]) {
    assertEquals(bf16AsF16(Uint16Array.of(f32ToBf16(1), f32ToBf16(v))), null, String(v));
  }
});
