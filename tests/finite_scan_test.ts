/**
 * The finiteness check on a worker (src/finite_scan.ts): which tensors its
 * flags vouch for, that a rewrite or a later read of the same memory replaces
 * them, that nothing unscanned is vouched for, and that a large model's load
 * really takes the worker path while NaN in it is still refused by name.
 */

import {
  assert,
  assertEquals,
  assertFalse,
  assertRejects,
  assertStringIncludes,
} from "@std/assert";
import { FiniteScan, SCAN_BLOCK_BYTES } from "../src/finite_scan.ts";
import { ModelFileError } from "../src/errors.ts";
import { loadModel } from "../src/load.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { MAMBA_130M, randomCheckpoint } from "../bench/make_random_model.ts";

const BLOCK_FLOATS = SCAN_BLOCK_BYTES / 4;

/** A started scan, closed after `fn`. */
async function withScan(fn: (scan: FiniteScan) => Promise<void>): Promise<void> {
  const scan = FiniteScan.start();
  assert(scan, "the worker must start here (Deno has Worker and SharedArrayBuffer)");
  try {
    await fn(scan);
  } finally {
    scan.close();
  }
}

/** `blocks` blocks of finite floats and a few more, over a new SharedArrayBuffer. */
function sharedFloats(scan: FiniteScan, blocks: number): Float32Array {
  const floats = new Float32Array(scan.sharedBytes((blocks * BLOCK_FLOATS + 5) * 4).buffer);
  for (let i = 0; i < floats.length; i++) floats[i] = (i % 97) - 48.5;
  return floats;
}

/**
 * Reports `floats`' bytes (or `bytes`, the same array as an earlier call's)
 * filled in pieces of `piece` bytes, then waits for the worker.
 */
async function scanAll(
  scan: FiniteScan,
  floats: Float32Array,
  piece: number,
  bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength),
): Promise<void> {
  for (let filled = piece; filled < bytes.length; filled += piece) scan.observe(bytes, filled);
  scan.observe(bytes, bytes.length);
  await scan.settled();
}

Deno.test("flags vouch for tensors in clean blocks only, whatever the piece boundaries", async () => {
  await withScan(async (scan) => {
    const floats = sharedFloats(scan, 4);
    const bits = new Uint32Array(floats.buffer);
    // Largest finite value, a subnormal and -0 are finite; a NaN with a payload is not.
    bits[5] = 0x7f7fffff;
    bits[6] = 0x00000001;
    bits[7] = 0x80000000;
    bits[2 * BLOCK_FLOATS + 3] = 0x7fc01234;
    await scanAll(scan, floats, 100_003 * 4); // Pieces that end inside blocks.
    const view = (from: number, to: number) => floats.subarray(from, to);
    assert(scan.vouches(view(0, 2 * BLOCK_FLOATS)), "blocks 0 and 1");
    assert(scan.vouches(view(3 * BLOCK_FLOATS, floats.length)), "block 3 and the tail");
    assertFalse(scan.vouches(view(2 * BLOCK_FLOATS + 3, 2 * BLOCK_FLOATS + 4)), "the NaN");
    assertFalse(scan.vouches(view(BLOCK_FLOATS, 3 * BLOCK_FLOATS + 1)), "a tensor over block 2");
    assertFalse(scan.vouches(view(2 * BLOCK_FLOATS + 100, 2 * BLOCK_FLOATS + 200)), "block 2");

    for (const bad of [0x7f800000, 0xff800000, 0xffffffff]) { // +Inf, -Inf, a negative NaN
      const other = sharedFloats(scan, 2);
      new Uint32Array(other.buffer)[other.length - 1] = bad;
      await scanAll(scan, other, 1 << 20);
      assert(scan.vouches(other.subarray(0, BLOCK_FLOATS)));
      assertFalse(scan.vouches(other.subarray(other.length - 1)), `0x${bad.toString(16)}`);
    }
  });
});

Deno.test("a rescan after a rewrite, or a later read of the same memory, replaces the flags", async () => {
  await withScan(async (scan) => {
    const floats = sharedFloats(scan, 3);
    const bytes = new Uint8Array(floats.buffer);
    floats[BLOCK_FLOATS + 9] = NaN;
    await scanAll(scan, floats, SCAN_BLOCK_BYTES, bytes);
    assertFalse(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));

    // The same array read again: the NaN is gone, Infinity is in block 0 now.
    floats[BLOCK_FLOATS + 9] = 1;
    floats[4] = Infinity;
    await scanAll(scan, floats, SCAN_BLOCK_BYTES, bytes);
    assert(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));
    assertFalse(scan.vouches(floats.subarray(0, 8)));
    floats[4] = 0;

    // Another array over the same memory starts being read: until it is read
    // to its end, the old flags vouch for nothing there, and its own (whole
    // but unfinished) blocks neither.
    await scanAll(scan, floats, SCAN_BLOCK_BYTES);
    assert(scan.vouches(floats.subarray(2 * BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
    const again = new Uint8Array(floats.buffer, SCAN_BLOCK_BYTES, 2 * SCAN_BLOCK_BYTES);
    scan.observe(again, SCAN_BLOCK_BYTES);
    await scan.settled();
    assertFalse(scan.vouches(floats.subarray(BLOCK_FLOATS, 2 * BLOCK_FLOATS)));
    assertFalse(scan.vouches(floats.subarray(2 * BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
    assertFalse(scan.vouches(floats.subarray(0, BLOCK_FLOATS)), "the old read's region is gone");
    scan.observe(again, again.length);
    await scan.settled();
    assert(scan.vouches(floats.subarray(BLOCK_FLOATS, 3 * BLOCK_FLOATS)));
  });
});

Deno.test("memory that was never scanned, or not to its end, is not vouched for", async () => {
  await withScan(async (scan) => {
    const scanned = sharedFloats(scan, 2);
    await scanAll(scan, scanned, SCAN_BLOCK_BYTES);
    assert(scan.vouches(scanned));
    assertFalse(scan.vouches(sharedFloats(scan, 2)), "another shared buffer");
    assertFalse(scan.vouches(new Float32Array(2 * BLOCK_FLOATS)), "a plain buffer");
    assertFalse(scan.vouches(scanned.slice(0, 10)), "a copy");

    const unfinished = sharedFloats(scan, 3);
    const bytes = new Uint8Array(unfinished.buffer);
    scan.observe(bytes, 2 * SCAN_BLOCK_BYTES);
    await scan.settled();
    assertFalse(scan.vouches(unfinished.subarray(0, BLOCK_FLOATS)), "a read that did not end");

    // Not 4-byte aligned in its buffer: not on the grid of words, not scanned.
    const odd = new Uint8Array(scan.sharedBytes(SCAN_BLOCK_BYTES + 8).buffer, 2, SCAN_BLOCK_BYTES);
    scan.observe(odd, odd.length);
    await scan.settled();
    assertFalse(scan.vouches(new Float32Array(odd.buffer, 4, 16)));

    scan.close();
    assertFalse(scan.vouches(scanned), "a closed scan");
  });
});

Deno.test("where no worker starts, or it fails, nothing is vouched for and nothing waits", async () => {
  const realWorker = globalThis.Worker;
  try {
    // deno-lint-ignore no-explicit-any
    delete (globalThis as any).Worker;
    assertEquals(FiniteScan.start(), null);

    // A worker that loads but fails (as a blob URL refused by a content policy would).
    globalThis.Worker = class extends EventTarget {
      onerror: ((event: Event) => void) | null = null;
      postMessage() {
        setTimeout(() => this.onerror?.(new ErrorEvent("error", { cancelable: true })), 10);
      }
      terminate() {}
    } as unknown as typeof Worker;
    const scan = FiniteScan.start();
    assert(scan);
    const floats = sharedFloats(scan, 2);
    await scanAll(scan, floats, SCAN_BLOCK_BYTES);
    assertFalse(scan.vouches(floats));
    scan.close();
  } finally {
    globalThis.Worker = realWorker;
  }
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

Deno.test("a large model's weights are checked on the worker, and NaN in them is still named", async () => {
  // 2 layers of d_model 512 and 34,000 rows: a 75 MB F32 file, above the size that starts a worker.
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
