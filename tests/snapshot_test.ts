/**
 * Snapshot integrity (issue #18, item 3): a checksum and the model's identity
 * in the format, finite states, any binary input accepted, no slot (backend
 * memory) kept by a failed restore, and a size that stops growing.
 */

import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import { crc32 } from "../src/checksum.ts";
import { loadCheckpoint, loadModel } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { JsBackend } from "../src/backends/js.ts";
import { Session, SNAPSHOT_IDS, SnapshotError } from "../src/session.ts";
import { SHARED } from "./helpers.ts";

const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;
const model = await loadModel(SHAKESPEARE, { backend: "js" });

async function snapshotAfter(text: string): Promise<Uint8Array> {
  const session = model.session();
  await session.prefill(model.tokenizer.encode(text));
  const bytes = await session.snapshot();
  session.dispose();
  return bytes;
}

/** Rewrites the trailing checksum after a deliberate change. */
function reseal(bytes: Uint8Array): Uint8Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  view.setUint32(bytes.length - 4, crc32(bytes.subarray(0, bytes.length - 4)), true);
  return bytes;
}

Deno.test("CRC-32 matches the standard check value", () => {
  assertEquals(crc32(new TextEncoder().encode("123456789")), 0xcbf43926);
  assertEquals(crc32(new Uint8Array()), 0);
});

Deno.test("a snapshot with one flipped bit anywhere is refused", async () => {
  const snapshot = await snapshotAfter("ROMEO:");
  const positions = [snapshot.length - 5, snapshot.length >> 1, 45, snapshot.length - 1];
  for (const position of positions) {
    for (const bit of [0, 3, 7]) {
      const damaged = snapshot.slice();
      damaged[position] ^= 1 << bit;
      assertThrows(() => model.session(damaged), SnapshotError);
    }
  }
  model.session(snapshot).dispose();
});

Deno.test("NaN or Infinity in a snapshot's state is refused even with a valid checksum", async () => {
  const snapshot = await snapshotAfter("ROMEO:");
  for (const bad of [NaN, Infinity]) {
    const damaged = snapshot.slice();
    new DataView(damaged.buffer).setFloat32(damaged.length - 8, bad, true);
    assertThrows(() => model.session(reseal(damaged)), SnapshotError, `SSM state holds ${bad}`);
  }
  // The first logit, after the header (40 bytes) and the ids.
  const ids = model.tokenizer.encode("ROMEO:").length;
  const damaged = snapshot.slice();
  new DataView(damaged.buffer).setFloat32(40 + 4 * ids, -Infinity, true);
  assertThrows(() => model.session(reseal(damaged)), SnapshotError, "the logits hold -Infinity");
});

Deno.test("a snapshot of another model with the same sizes is refused", async () => {
  const { config, weights } = await loadCheckpoint(SHAKESPEARE);
  const same = new MambaModel(new JsBackend(), config, weights);
  const nudged = weights.normF.slice();
  nudged[0] += 1e-3;
  const other = new MambaModel(new JsBackend(), config, { ...weights, normF: nudged });
  const session = new Session(same);
  await session.prefill([1, 2, 3]);
  const snapshot = await session.snapshot();
  new Session(same, snapshot).dispose();
  assertThrows(() => new Session(other, snapshot), SnapshotError, "another model");
});

Deno.test("an ArrayBuffer or any view restores; other values are a SnapshotError", async () => {
  const snapshot = await snapshotAfter("ROMEO:");
  const logits = (await model.session(snapshot).logits())!;
  const buffer = snapshot.slice().buffer;
  for (const input of [buffer, new DataView(buffer), new Uint8Array(buffer)]) {
    assertEquals(await model.session(input).logits(), logits);
  }
  // A view of part of a larger buffer.
  const larger = new Uint8Array(snapshot.length + 16);
  larger.set(snapshot, 8);
  assertEquals(await model.session(larger.subarray(8, 8 + snapshot.length)).logits(), logits);
  for (const wrong of [42, "snapshot", {}, null, [1, 2, 3]]) {
    assertThrows(
      () => model.session(wrong as unknown as Uint8Array),
      SnapshotError,
      "expected bytes",
    );
  }
  const fromPromise = model.session(Promise.resolve(buffer));
  assertEquals(await fromPromise.logits(), logits);
});

Deno.test("failed restores keep no slot: the pool does not grow", async () => {
  for (const backend of ["js", "wasm"] as const) {
    const loaded = backend === "js" ? model : await loadModel(SHAKESPEARE, { backend, threads: 1 });
    const snapshot = await (async () => {
      const s = loaded.session();
      await s.prefill([1, 2]);
      const bytes = await s.snapshot();
      s.dispose();
      return bytes;
    })();
    const damaged = snapshot.slice();
    damaged[damaged.length >> 1] ^= 1;
    const held = loaded.session();
    const failures = async () => {
      assertThrows(() => loaded.session(new ArrayBuffer(5)), SnapshotError);
      assertThrows(() => loaded.session(damaged), SnapshotError);
      assertThrows(() => loaded.session(7 as unknown as Uint8Array), SnapshotError);
      // This one holds a slot until its bytes arrive, then gives it back.
      const later = loaded.session(Promise.resolve(damaged));
      await assertRejects(() => later.step(1), SnapshotError, "checksum");
      await new Promise((resolve) => setTimeout(resolve, 0));
    };
    // The pool settles at its size for the live sessions and one restoring.
    await failures();
    const capacity = loaded.model.pool.capacity;
    const used = loaded.model.pool.used;
    for (let i = 0; i < 20; i++) await failures();
    // Sessions of other tests that were dropped may be collected meanwhile: fewer is fine.
    assert(loaded.model.pool.used <= used, `${backend}: slots stayed in use`);
    assertEquals(loaded.model.pool.capacity, capacity, `${backend}: the pool grew`);
    held.dispose();
  }
});

Deno.test("a snapshot keeps the last ids only, so its size stops growing", async () => {
  const tiny = await loadCheckpoint(`${SHARED}/fixtures/hf-oracle/tiny-f32`);
  const tinyModel = new MambaModel(new JsBackend(), tiny.config, tiny.weights);
  const session = new Session(tinyModel);
  const ids = Array.from({ length: SNAPSHOT_IDS + 500 }, (_, i) => (i * 7) % 256);
  await session.prefill(ids.slice(0, 100));
  const small = await session.snapshot();
  await session.prefill(ids.slice(100));
  const full = await session.snapshot();
  const fullLogits = await session.logits();
  await session.step(3);
  const later = await session.snapshot();
  assertEquals(full.length, later.length);
  assertEquals(full.length - small.length, (SNAPSHOT_IDS - 100) * 4);
  const resumed = new Session(tinyModel, full);
  assertEquals(resumed.tokens, ids.slice(-SNAPSHOT_IDS));
  assertEquals(await resumed.logits(), fullLogits);
  assert(full.length < 4 * SNAPSHOT_IDS + 1_000_000);
});
