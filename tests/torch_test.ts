/**
 * PyTorch checkpoints (`pytorch_model.bin`, single and sharded) load with
 * the same tensors as the safetensors checkpoints they were saved from, a
 * pickle that calls anything else is refused, hand-built archives with one
 * bad field (a storage's or tensor's numbers, zero strides, a zip64 field, a
 * long APPENDS) get an error naming the file, and a model without a
 * tokenizer loads for ids, or takes one from elsewhere.
 */

import {
  assert,
  assertEquals,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { loadModel } from "../src/load.ts";
import { SafetensorsFile } from "../src/safetensors.ts";
import { readTorchWeights, TorchFile } from "../src/torch.ts";
import { openSource } from "../src/source.ts";
import { oracleDiff, SHARED } from "./helpers.ts";

const TORCH = `${SHARED}/fixtures/torch-bin`;
const ORACLE = `${SHARED}/fixtures/hf-oracle`;

for (const name of ["odd-bf16", "tiny-f32-sharded"]) {
  Deno.test(`${name}: pytorch_model.bin holds the safetensors checkpoint's tensors`, async () => {
    const oracleName = name.replace("-sharded", "");
    const reference = SafetensorsFile.parse(
      await Deno.readFile(`${ORACLE}/${oracleName}/model.safetensors`),
      "model.safetensors",
    );
    const store = await readTorchWeights(await openSource(`${TORCH}/${name}`));
    for (const tensor of reference.tensors.keys()) {
      const file = store.fileOf(tensor, "in the safetensors checkpoint");
      assertEquals(file.info(tensor).shape, reference.info(tensor).shape, tensor);
      assertEquals(
        new Uint32Array(file.float32(tensor).slice().buffer),
        new Uint32Array(reference.float32(tensor).slice().buffer),
        tensor,
      );
    }
  });

  Deno.test(`${name}: loadModel reads pytorch_model.bin and gives the oracle's logits`, async () => {
    const model = await loadModel(`${TORCH}/${name}`, { backend: "js" });
    const diff = await oracleDiff(model, name.replace("-sharded", ""));
    assert(diff < 1e-4, `max |Δlogit| ${diff}`);
  });
}

Deno.test("a pickle that calls os.system is refused before anything runs", async () => {
  const path = `${TORCH}/malicious/os_system.bin`;
  const error = assertThrows(() => TorchFile.parse(Deno.readFileSync(path), path), ModelFileError);
  assertStringIncludes(error.message, path);
  assertStringIncludes(error.message, "posix.system");
  assertStringIncludes(error.message, "refused");
  // Through loadModel too: a model directory whose only weights are that file.
  const dir = await Deno.makeTempDir({ prefix: "mamba-torch-test-" });
  try {
    await Deno.copyFile(`${TORCH}/odd-bf16/config.json`, `${dir}/config.json`);
    await Deno.copyFile(path, `${dir}/pytorch_model.bin`);
    await assertRejects(() => loadModel(dir, { backend: "js" }), ModelFileError, "posix.system");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("damaged archives and pickles get an error naming the file", async (t) => {
  const good = await Deno.readFile(`${TORCH}/odd-bf16/pytorch_model.bin`);
  await t.step("not a zip", () => {
    assertThrows(() => TorchFile.parse(new Uint8Array(100), "x.bin"), ModelFileError, "Not a zip");
  });
  await t.step("truncated", () => {
    assertThrows(() => TorchFile.parse(good.subarray(0, 5000), "x.bin"), ModelFileError, "x.bin");
  });
  await t.step("a storage cut short", () => {
    // The first storage (data/0, the embedding) shrinks in the central directory: its tensor reaches past it.
    const bytes = good.slice();
    const text = new TextDecoder("latin1").decode(bytes);
    const entry = text.lastIndexOf("PK\x01\x02", text.lastIndexOf("pytorch_model/data/0"));
    new DataView(bytes.buffer).setUint32(entry + 20, 100, true);
    new DataView(bytes.buffer).setUint32(entry + 24, 100, true);
    assertThrows(() => TorchFile.parse(bytes, "x.bin"), ModelFileError, "x.bin");
  });
});

Deno.test("a model without a tokenizer loads for ids; text methods say none is loaded", async () => {
  const model = await loadModel(`${ORACLE}/tiny-f32`, { backend: "js" });
  assertEquals(model.hasTokenizer, false);
  assertEquals((await model.forward([1, 2, 3])).length, 3 * model.vocabSize);
  await model.session().prefill([1, 2, 3]);
  assertThrows(() => model.tokenizer, Error, "No tokenizer is loaded");
  assertThrows(() => model.generate("hello"), Error, "No tokenizer is loaded");
});

Deno.test("a tokenizer from elsewhere: a directory or a tokenizer.json, checked first", async () => {
  const shakespeare = `${SHARED}/models/tiny-shakespeare`;
  const dir = await Deno.makeTempDir({ prefix: "mamba-tokenizer-test-" });
  const bare = await Deno.makeTempDir({ prefix: "mamba-tokenizer-test-" });
  try {
    await Deno.copyFile(`${shakespeare}/config.json`, `${dir}/config.json`);
    await Deno.symlink(`${shakespeare}/model.safetensors`, `${dir}/model.safetensors`);
    const cases = JSON.parse(await Deno.readTextFile(`${SHARED}/fixtures/tokenizer/cases.json`));
    for (const tokenizer of [shakespeare, `${shakespeare}/tokenizer.json`]) {
      const model = await loadModel(dir, { backend: "js", tokenizer });
      for (const { text, ids } of cases["tiny-shakespeare"]) {
        assertEquals(model.tokenizer.encode(text), ids, JSON.stringify(text));
      }
    }
    // GPT-NeoX's 50,277 ids do not fit tiny-f32's 256 rows: refused before the (absent) weights are read.
    await Deno.copyFile(`${ORACLE}/tiny-f32/config.json`, `${bare}/config.json`);
    const error = await assertRejects(
      () => loadModel(bare, { backend: "js", tokenizer: `${SHARED}/tokenizers/gpt-neox-20b` }),
      ModelFileError,
    );
    assertStringIncludes(error.message, "gpt-neox-20b/tokenizer.json");
    assertStringIncludes(error.message, "embedding rows");
  } finally {
    await Deno.remove(dir, { recursive: true });
    await Deno.remove(bare, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Hand-built archives: one float32 tensor "w", each with one field made bad.

/** Little-endian bytes of a u16 or u32. */
const le = (value: number, bytes: 2 | 4) =>
  Array.from({ length: bytes }, (_, i) => (value >>> (8 * i)) & 255);

/** A pickle (protocol 2) of {"w": _rebuild_tensor_v2(storage "0", offset, shape, stride)}. */
function tensorPickle(
  { numel, offset, shape, stride, extra = [] }: {
    numel: number;
    offset: number;
    shape: number[];
    stride: number[];
    extra?: number[];
  },
): Uint8Array {
  const text = (s: string) => [0x58, ...le(s.length, 4), ...new TextEncoder().encode(s)];
  const global = (s: string) => [0x63, ...new TextEncoder().encode(s)];
  // A whole number as BININT, anything else as BINFLOAT.
  const number = (n: number) => {
    if (Number.isInteger(n) && n >= 0 && n < 2 ** 31) return [0x4a, ...le(n, 4)];
    const float = new DataView(new ArrayBuffer(8));
    float.setFloat64(0, n);
    return [0x47, ...new Uint8Array(float.buffer)];
  };
  const tuple = (items: number[]) => [0x28, ...items.flatMap(number), 0x74];
  return Uint8Array.from([
    0x80,
    2,
    0x7d,
    0x28, // PROTO 2, EMPTY_DICT, MARK
    ...text("w"),
    ...global("torch._utils\n_rebuild_tensor_v2\n"),
    0x28, // MARK: the arguments
    ...[0x28, ...text("storage"), ...global("torch\nFloatStorage\n"), ...text("0"), ...text("cpu")],
    ...number(numel),
    0x74,
    0x51, // TUPLE, BINPERSID
    ...number(offset),
    ...tuple(shape),
    ...tuple(stride),
    0x89,
    0x7d,
    0x74,
    0x52, // NEWFALSE, EMPTY_DICT, TUPLE, REDUCE
    0x75, // SETITEMS
    ...extra,
    0x2e, // STOP
  ]);
}

/** An uncompressed zip of `entries`; `zip64Extra` gives the first directory entry sizes of 0xffffffff and an empty zip64 field. */
function zipOf(entries: [string, Uint8Array][], zip64Extra = false): Uint8Array {
  const out: number[] = [];
  const directory: number[] = [];
  entries.forEach(([name, data], i) => {
    const nameBytes = [...new TextEncoder().encode(name)];
    const offset = out.length;
    const sizes = [...le(data.length, 4), ...le(data.length, 4)];
    out.push(...le(0x04034b50, 4), ...le(20, 2), ...le(0, 2), ...le(0, 2), ...le(0, 4));
    out.push(...le(0, 4), ...sizes, ...le(nameBytes.length, 2), ...le(0, 2), ...nameBytes);
    for (const byte of data) out.push(byte); // Not spread: a long pickle would overflow the stack.
    const odd = zip64Extra && i === 0;
    const extra = odd ? [...le(1, 2), ...le(0, 2)] : [];
    directory.push(...le(0x02014b50, 4), ...le(20, 2), ...le(20, 2), ...le(0, 2), ...le(0, 2));
    directory.push(...le(0, 4), ...le(0, 4));
    directory.push(...(odd ? le(0xffffffff, 4).concat(le(0xffffffff, 4)) : sizes));
    directory.push(...le(nameBytes.length, 2), ...le(extra.length, 2), ...le(0, 2), ...le(0, 2));
    directory.push(...le(0, 2), ...le(0, 4), ...le(offset, 4), ...nameBytes, ...extra);
  });
  const at = out.length;
  out.push(...directory, ...le(0x06054b50, 4), ...le(0, 2), ...le(0, 2));
  out.push(...le(entries.length, 2), ...le(entries.length, 2), ...le(directory.length, 4));
  out.push(...le(at, 4), ...le(0, 2));
  return Uint8Array.from(out);
}

/** A torch.save archive of tensor "w" over a storage of `storageFloats` floats 0, 1, 2… */
function tensorArchive(pickle: Uint8Array, storageFloats: number, zip64Extra = false): Uint8Array {
  const storage = new Uint8Array(Float32Array.from({ length: storageFloats }, (_, i) => i).buffer);
  return zipOf([["archive/data.pkl", pickle], ["archive/data/0", storage]], zip64Extra);
}

Deno.test("hand-built archives: the tensor reads, and each bad field gets an error naming the file", async (t) => {
  const plain = { numel: 6, offset: 0, shape: [2, 3], stride: [3, 1] };
  await t.step("a plain tensor reads back", () => {
    const file = TorchFile.parse(tensorArchive(tensorPickle(plain), 6), "x.bin");
    assertEquals([...file.float32("w")], [0, 1, 2, 3, 4, 5]);
  });
  await t.step("a list of 200,000 items appended at once (APPENDS)", () => {
    // EMPTY_LIST, MARK, NONE, DUP × 200,000, APPENDS, POP: a stack overflow when spread as arguments.
    const extra = [0x5d, 0x28, 0x4e, ...new Array(200_000).fill(0x32), 0x65, 0x30];
    const file = TorchFile.parse(tensorArchive(tensorPickle({ ...plain, extra }), 6), "x.bin");
    assertEquals([...file.float32("w")], [0, 1, 2, 3, 4, 5]);
  });
  const refused: [string, Uint8Array, string][] = [
    ["a storage of NaN elements", tensorPickle({ ...plain, numel: NaN }), "not a torch storage"],
    ["a fractional offset", tensorPickle({ ...plain, offset: 0.5 }), "not a storage, offset"],
    ["a NaN offset", tensorPickle({ ...plain, offset: NaN }), "not a storage, offset"],
    [
      "zero strides: 2^28 × 64 elements over a storage of one",
      tensorPickle({ numel: 1, offset: 0, shape: [2 ** 28, 64], stride: [0, 0] }),
      "more than its storage's 1",
    ],
  ];
  for (const [name, pickle, message] of refused) {
    await t.step(name, () => {
      const bytes = tensorArchive(pickle, 6);
      const error = assertThrows(() => TorchFile.parse(bytes, "x.bin"), ModelFileError, message);
      assertStringIncludes(error.message, "x.bin");
    });
  }
  await t.step("a zip64 extra field too short for the sizes it stands for", () => {
    const bytes = tensorArchive(tensorPickle(plain), 6, true);
    assertThrows(() => TorchFile.parse(bytes, "x.bin"), ModelFileError, "zip64 field too short");
  });
});
