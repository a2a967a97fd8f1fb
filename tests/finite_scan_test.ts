/**
 * The finiteness check during reads (src/finite_scan.ts): which tensors its
 * flags vouch for, in its own WebAssembly memory (the SIMD scan) and in
 * memory lent by others (the JavaScript scan), that a rewrite or a later read
 * of the same memory replaces them, that nothing unscanned is vouched for,
 * and that a model's load really takes this path while NaN in it is still
 * refused by name.
 */

import {
  assert,
  assertEquals,
  assertFalse,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "@std/assert";
import { FiniteScan, SCAN_BLOCK_BYTES } from "../src/finite_scan.ts";
import { ModelFileError } from "../src/errors.ts";
import { loadModel } from "../src/load.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { MAMBA_130M, randomCheckpoint } from "../bench/make_random_model.ts";

const BLOCK_FLOATS = SCAN_BLOCK_BYTES / 4;

/** Where the bytes of a file can be: what the scan lends, a plain array, shared memory (the wasm backend's). */
const MEMORIES = {
  "the scan's memory": (scan: FiniteScan, bytes: number) => scan.bytes(bytes),
  "a plain array": (_scan: FiniteScan, bytes: number) => new Uint8Array(bytes),
  "shared memory": (_scan: FiniteScan, bytes: number) =>
    new Uint8Array(new SharedArrayBuffer(bytes)),
};

/** `blocks` blocks of finite floats and a few more (not a whole 16 bytes), in `memory`. */
function floatsIn(
  memory: (scan: FiniteScan, bytes: number) => Uint8Array,
  scan: FiniteScan,
  blocks: number,
): Float32Array {
  const bytes = memory(scan, (blocks * BLOCK_FLOATS + 7) * 4);
  const floats = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  for (let i = 0; i < floats.length; i++) floats[i] = (i % 97) - 48.5;
  return floats;
}

/**
 * Reports `floats`' bytes (or `bytes`, the same array as an earlier call's)
 * filled in pieces of `piece` bytes.
 */
function scanAll(
  scan: FiniteScan,
  floats: Float32Array,
  piece: number,
  bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength),
): void {
  for (let filled = piece; filled < bytes.length; filled += piece) scan.observe(bytes, filled);
  scan.observe(bytes, bytes.length);
}

Deno.test("the scan lends WebAssembly memory for a file, and a plain array where it cannot", () => {
  const scan = new FiniteScan();
  const lent = scan.bytes(SCAN_BLOCK_BYTES + 12);
  assertEquals(lent.length, SCAN_BLOCK_BYTES + 12);
  assertEquals(lent.byteOffset, 0);
  assert(lent.every((byte) => byte === 0));
  // A WebAssembly memory's buffer cannot be transferred: so the SIMD scan will read it.
  assertThrows(() => structuredClone(lent.buffer, { transfer: [lent.buffer as ArrayBuffer] }));
  const realWebAssembly = globalThis.WebAssembly;
  try {
    // deno-lint-ignore no-explicit-any
    delete (globalThis as any).WebAssembly;
    const plain = new FiniteScan().bytes(100);
    assertEquals(plain.length, 100);
    structuredClone(plain.buffer, { transfer: [plain.buffer as ArrayBuffer] });
  } finally {
    globalThis.WebAssembly = realWebAssembly;
  }
});

for (const [where, memory] of Object.entries(MEMORIES)) {
  Deno.test(`in ${where}, flags vouch for tensors in clean blocks only, whatever the piece boundaries`, () => {
    const scan = new FiniteScan();
    const floats = floatsIn(memory, scan, 4);
    const bits = new Uint32Array(floats.buffer, floats.byteOffset, floats.length);
    // Largest finite value, a subnormal and -0 are finite; a NaN with a payload is not.
    bits[5] = 0x7f7fffff;
    bits[6] = 0x00000001;
    bits[7] = 0x80000000;
    bits[2 * BLOCK_FLOATS + 3] = 0x7fc01234;
    scanAll(scan, floats, 100_003 * 4); // Pieces that end inside blocks.
    const view = (from: number, to: number) => floats.subarray(from, to);
    assert(scan.vouches(view(0, 2 * BLOCK_FLOATS)), "blocks 0 and 1");
    assert(scan.vouches(view(3 * BLOCK_FLOATS, floats.length)), "block 3 and the tail");
    assertFalse(scan.vouches(view(2 * BLOCK_FLOATS + 3, 2 * BLOCK_FLOATS + 4)), "the NaN");
    assertFalse(scan.vouches(view(BLOCK_FLOATS, 3 * BLOCK_FLOATS + 1)), "a tensor over block 2");
    assertFalse(scan.vouches(view(2 * BLOCK_FLOATS + 100, 2 * BLOCK_FLOATS + 200)), "block 2");

    // +Inf, -Inf and a negative NaN, in each lane of a 16-byte step and in the tail.
    for (const bad of [0x7f800000, 0xff800000, 0xffffffff]) {
      for (const at of [BLOCK_FLOATS, BLOCK_FLOATS + 1, BLOCK_FLOATS + 6, 2 * BLOCK_FLOATS + 3]) {
        const other = floatsIn(memory, scan, 2);
        new Uint32Array(other.buffer, other.byteOffset, other.length)[at] = bad;
        scanAll(scan, other, 1 << 20);
        assert(scan.vouches(other.subarray(0, BLOCK_FLOATS)));
        assertFalse(scan.vouches(other.subarray(at, at + 1)), `0x${bad.toString(16)} at ${at}`);
      }
    }
  });
}

Deno.test("a rescan after a rewrite, or a later read of the same memory, replaces the flags", () => {
  const scan = new FiniteScan();
  const floats = floatsIn(MEMORIES["the scan's memory"], scan, 3);
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  floats[BLOCK_FLOATS + 9] = NaN;
  scanAll(scan, floats, SCAN_BLOCK_BYTES, bytes);
  assertFalse(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));

  // The same array read again: the NaN is gone, Infinity is in block 0 now.
  floats[BLOCK_FLOATS + 9] = 1;
  floats[4] = Infinity;
  scanAll(scan, floats, SCAN_BLOCK_BYTES, bytes);
  assert(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));
  assertFalse(scan.vouches(floats.subarray(0, 8)));
  floats[4] = 0;

  // Another array over the same memory starts being read: until it is read
  // to its end, the old flags vouch for nothing there, and its own (whole
  // but unfinished) blocks neither.
  scanAll(scan, floats, SCAN_BLOCK_BYTES);
  assert(scan.vouches(floats.subarray(2 * BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
  const again = new Uint8Array(floats.buffer, SCAN_BLOCK_BYTES, 2 * SCAN_BLOCK_BYTES);
  scan.observe(again, SCAN_BLOCK_BYTES);
  assertFalse(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));
  assertFalse(scan.vouches(floats.subarray(2 * BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
  assertFalse(scan.vouches(floats.subarray(0, BLOCK_FLOATS)), "the old read's region is gone");
  scan.observe(again, again.length);
  assert(scan.vouches(floats.subarray(BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
});

Deno.test("memory that was never scanned, or not to its end, is not vouched for", () => {
  const scan = new FiniteScan();
  const lent = MEMORIES["the scan's memory"];
  const scanned = floatsIn(lent, scan, 2);
  scanAll(scan, scanned, SCAN_BLOCK_BYTES);
  assert(scan.vouches(scanned));
  assertFalse(scan.vouches(floatsIn(lent, scan, 2)), "another array");
  assertFalse(scan.vouches(new Float32Array(2 * BLOCK_FLOATS)), "a plain array");
  assertFalse(scan.vouches(scanned.slice(0, 10)), "a copy");

  const unfinished = floatsIn(lent, scan, 3);
  scan.observe(new Uint8Array(unfinished.buffer, 0, unfinished.byteLength), 2 * SCAN_BLOCK_BYTES);
  assertFalse(scan.vouches(unfinished.subarray(0, BLOCK_FLOATS)), "a read that did not end");

  // Not 4-byte aligned in its buffer: not on the grid of words, not scanned.
  const odd = new Uint8Array(new ArrayBuffer(SCAN_BLOCK_BYTES + 8), 2, SCAN_BLOCK_BYTES);
  scan.observe(odd, odd.length);
  assertFalse(scan.vouches(new Float32Array(odd.buffer, 4, 16)));
});

/** Counts the tensors a scan vouched for while `fn` runs. */
async function countVouched(fn: () => Promise<void>): Promise<{ yes: number; no: number }> {
  const original = FiniteScan.prototype.vouches;
  const counts = { yes: 0, no: 0 };
  FiniteScan.prototype.vouches = function (values) {
    const vouched = original.call(this, values);
    counts[vouched ? "yes" : "no"]++;
    return vouched;
  };
  try {
    await fn();
  } finally {
    FiniteScan.prototype.vouches = original;
  }
  return counts;
}

Deno.test("a large model's weights are checked as they are read, and NaN in them is still named", async () => {
  // 2 layers of d_model 512 and 34,000 rows: a 75 MB F32 file, read in several pieces.
  const shape = { ...MAMBA_130M, nLayer: 2, dModel: 512, vocabSize: 34_000 };
  const { config, safetensors } = randomCheckpoint(shape);
  const dir = await Deno.makeTempDir({ prefix: "mamba-finite-scan-" });
  try {
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
    await Deno.writeFile(`${dir}/model.safetensors`, safetensors);
    // The embedding, norm_f and 10 tensors per layer (no biases on the projections).
    const stored = 2 + 2 * 10;
    for (const backend of ["js", "wasm"] as const) {
      const counts = await countVouched(async () => {
        const model = await loadModel(dir, { backend, threads: 2 });
        model.dispose();
      });
      assertEquals(counts, { yes: stored, no: 0 }, backend);
    }

    // Downloaded (the pieces are the response's chunks), then read from the download cache.
    const controller = new AbortController();
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, signal: controller.signal, onListen() {} },
      async (request) => {
        const file = new URL(request.url).pathname.split("/").pop();
        const bytes = await Deno.readFile(`${dir}/${file}`).catch(() => null);
        return bytes ? new Response(bytes) : new Response("no", { status: 404 });
      },
    );
    try {
      const url = `http://127.0.0.1:${server.addr.port}/model/`;
      const cacheDir = `${dir}/cache`;
      for (const from of ["the network", "the cache"]) {
        const counts = await countVouched(async () => {
          (await loadModel(url, { backend: "js", cacheDir })).dispose();
        });
        assertEquals(counts, { yes: stored, no: 0 }, from);
      }
    } finally {
      controller.abort();
      await server.finished;
    }

    const name = "backbone.layers.1.mixer.out_proj.weight";
    // Mid-tensor, so that no block it shares with a neighbour is flagged.
    SafetensorsFile.parse(safetensors, "model.safetensors").float32(name)[300_000] = -Infinity;
    await Deno.writeFile(`${dir}/model.safetensors`, safetensors);
    const counts = await countVouched(async () => {
      const error = await assertRejects(() => loadModel(dir, { backend: "js" }), ModelFileError);
      assertStringIncludes(error.message, `${dir}/model.safetensors`);
      assertStringIncludes(error.message, `Tensor "${name}" holds -Infinity at index 300000`);
    });
    // Every tensor before it in the walk (all but norm_f) was vouched for; it was not.
    assertEquals(counts, { yes: stored - 2, no: 1 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
