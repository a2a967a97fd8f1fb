/**
 * config.json values that no checkpoint has are refused naming the key
 * (issue #18, item 1), while every reference config still parses.
 */

import { assertEquals, assertRejects, assertStringIncludes, assertThrows } from "@std/assert";
import { parseConfig } from "../src/config.ts";
import { loadCheckpoint, loadModel } from "../src/load.ts";
import { ModelFileError } from "../src/errors.ts";
import { SHARED } from "./helpers.ts";

const BASE = { hidden_size: 64, num_hidden_layers: 2, vocab_size: 256 };

function assertRefused(raw: Record<string, unknown>, ...fragments: string[]): void {
  const error = assertThrows(() => parseConfig(raw, "dir/config.json"), ModelFileError);
  assertEquals(error.file, "dir/config.json");
  for (const fragment of fragments) assertStringIncludes(error.message, fragment);
}

Deno.test("an implausible layer_norm_epsilon is refused naming the key", () => {
  assertRefused({ ...BASE, layer_norm_epsilon: 1.5 }, `"layer_norm_epsilon" 1.5 is implausible`);
  assertRefused({ ...BASE, layer_norm_epsilon: 1e300 }, `"layer_norm_epsilon"`, "implausible");
  assertRefused({ ...BASE, layer_norm_epsilon: 1e-300 }, `"layer_norm_epsilon"`, "implausible");
  assertRefused({ ...BASE, norm_epsilon: 0.5 }, `"norm_epsilon" 0.5 is implausible`);
  assertRefused({ ...BASE, norm_epsilon: -1 }, `"norm_epsilon" must be a positive number`);
  assertEquals(parseConfig({ ...BASE, layer_norm_epsilon: 1e-6 }, "c").eps, 1e-6);
});

Deno.test("expand contradicting intermediate_size is refused naming both keys", () => {
  assertRefused(
    { ...BASE, expand: 2, intermediate_size: 100 },
    `"expand" 2`,
    `"intermediate_size" 100`,
  );
  assertRefused({ ...BASE, expand: 3, d_inner: 128 }, `"expand" 3`, `"d_inner" 128`);
  assertEquals(parseConfig({ ...BASE, expand: 2, intermediate_size: 128 }, "c").dInner, 128);
  assertEquals(parseConfig({ ...BASE, intermediate_size: 100 }, "c").dInner, 100);
});

Deno.test("every reference config still parses", async () => {
  for (
    const dir of [
      "fixtures/hf-oracle/tiny-f32",
      "fixtures/hf-oracle/odd-bf16",
      "fixtures/torch-bin/tiny-f32-sharded",
      "models/tiny-shakespeare",
    ]
  ) {
    const raw = JSON.parse(await Deno.readTextFile(`${SHARED}/${dir}/config.json`));
    parseConfig(raw, dir);
  }
});

Deno.test("a tensor missing because of the config names config.json and the key (found by fuzzing)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tiny = `${SHARED}/fixtures/hf-oracle/tiny-f32`;
    await Deno.copyFile(`${tiny}/model.safetensors`, `${dir}/model.safetensors`);
    const config = JSON.parse(await Deno.readTextFile(`${tiny}/config.json`));
    const cases: [Record<string, unknown>, string][] = [
      [{ num_hidden_layers: 3 }, "config.json says num_hidden_layers 3"],
      [{ use_bias: true }, "config.json sets use_bias to true"],
    ];
    for (const [change, fragment] of cases) {
      await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...config, ...change }));
      const error = await assertRejects(() => loadCheckpoint(dir), ModelFileError);
      assertStringIncludes(error.message, "Missing tensor");
      assertStringIncludes(error.message, fragment);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a vocab_size that contradicts both the weights and the tokenizer is reported against the weights, not the tokenizer (found by fuzzing)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const model = new URL("../models/tiny-shakespeare/", import.meta.url).pathname;
    for (const file of ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]) {
      await Deno.copyFile(`${model}/${file}`, `${dir}/${file}`);
    }
    const config = JSON.parse(await Deno.readTextFile(`${model}/config.json`));
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...config, vocab_size: 1 }));
    const error = await assertRejects(() => loadModel(dir, { backend: "js" }), ModelFileError);
    // Reported against the weights, with what config.json says (as the header check words it).
    assertEquals(error.file, `${dir}/model.safetensors`);
    assertStringIncludes(error.message, `${dir}/config.json says`);
    assertStringIncludes(error.message, "vocab_size 1");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
