/**
 * PyTorch checkpoints (`pytorch_model.bin`, single and sharded) load with
 * the same tensors as the safetensors checkpoints they were saved from, a
 * pickle that calls anything else is refused, and a model without a
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
