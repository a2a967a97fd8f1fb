/**
 * The tokenizer against transformers' reference ids (shared fixtures) for
 * gpt-neox-20b and the bundled tiny-shakespeare model, the streaming decoder,
 * and the errors for unknown ids and malformed files.
 */

import {
  assert,
  assertEquals,
  assertInstanceOf,
  assertStringIncludes,
  assertThrows,
} from "@std/assert";
import { ModelFileError } from "../src/errors.ts";
import { MambaTokenizer, StreamingDecoder } from "../src/tokenizer.ts";
import { SHARED } from "./helpers.ts";

interface Case {
  text: string;
  ids: number[];
  decoded: string;
}

const CASES: Record<string, Case[]> = JSON.parse(
  await Deno.readTextFile(`${SHARED}/fixtures/tokenizer/cases.json`),
);

const readJson = async (path: string): Promise<unknown> =>
  JSON.parse(await Deno.readTextFile(path));

const DIRS: Record<string, string> = {
  "gpt-neox-20b": `${SHARED}/tokenizers/gpt-neox-20b`,
  "tiny-shakespeare": `${SHARED}/models/tiny-shakespeare`,
};
const JSONS: Record<string, unknown> = {};
const CONFIGS: Record<string, unknown> = {};
// Built once: the neox tokenizer takes ~100 ms to construct.
const TOKENIZERS: Record<string, MambaTokenizer> = {};
for (const [name, dir] of Object.entries(DIRS)) {
  JSONS[name] = await readJson(`${dir}/tokenizer.json`);
  CONFIGS[name] = await readJson(`${dir}/tokenizer_config.json`);
  TOKENIZERS[name] = MambaTokenizer.fromJSON(JSONS[name], CONFIGS[name], `${dir}/tokenizer.json`);
}
const NEOX = TOKENIZERS["gpt-neox-20b"];
const SHAKESPEARE = TOKENIZERS["tiny-shakespeare"];
const NEOX_FILE = `${DIRS["gpt-neox-20b"]}/tokenizer.json`;

/** Streams `ids` through a decoder, returning every delta (the flush last). */
function stream(tokenizer: MambaTokenizer, ids: readonly number[], prompt?: number[]): string[] {
  const decoder = new StreamingDecoder(tokenizer, prompt);
  const deltas = ids.map((id) => decoder.push(id));
  deltas.push(decoder.flush());
  return deltas;
}

Deno.test("the fixtures cover both tokenizers, with multibyte and empty cases", () => {
  assertEquals(Object.keys(CASES).sort(), Object.keys(DIRS).sort());
  for (const cases of Object.values(CASES)) {
    assert(cases.length > 10);
    assert(cases.some((c) => c.text === ""));
    assert(cases.some((c) => /\p{Extended_Pictographic}/u.test(c.text)));
  }
});

for (const [name, cases] of Object.entries(CASES)) {
  Deno.test(`${name}: encode and decode match transformers on every fixture`, () => {
    const tokenizer = TOKENIZERS[name];
    for (const { text, ids, decoded } of cases) {
      assertEquals(tokenizer.encode(text), ids, `encode(${JSON.stringify(text)})`);
      assertEquals(tokenizer.decode(ids), decoded, `decode of ${JSON.stringify(text)}`);
    }
  });

  Deno.test(`${name}: streaming every fixture id by id gives decode(ids), never a partial character`, () => {
    const tokenizer = TOKENIZERS[name];
    for (const { text, ids } of cases) {
      const full = tokenizer.decode(ids);
      const deltas = stream(tokenizer, ids);
      assertEquals(deltas.join(""), full, `streamed ${JSON.stringify(text)}`);
      if (!full.includes("\uFFFD")) {
        for (const delta of deltas) {
          assert(!delta.includes("\uFFFD"), `delta ${JSON.stringify(delta)}`);
        }
      }
    }
  });

  Deno.test(`${name}: streaming after a prompt emits only the continuation`, () => {
    const tokenizer = TOKENIZERS[name];
    for (const { ids } of cases) {
      for (let split = 1; split < ids.length; split++) {
        const prompt = ids.slice(0, split);
        const promptText = tokenizer.decode(prompt);
        if (promptText.endsWith("\uFFFD")) continue; // the prompt itself ends mid-character
        const deltas = stream(tokenizer, ids.slice(split), prompt);
        assertEquals(promptText + deltas.join(""), tokenizer.decode(ids));
      }
    }
  });
}

Deno.test("streaming holds back a character split across tokens", () => {
  // "🤖" is split over several byte-level tokens by gpt-neox-20b.
  const ids = NEOX.encode("🤖🚀");
  assert(ids.length > 2);
  assert(NEOX.decode(ids.slice(0, 1)).endsWith("\uFFFD"), "the first token alone is partial");
  const deltas = stream(NEOX, ids);
  assert(deltas.slice(0, -1).includes(""), "some push returns nothing");
  assertEquals(deltas.join(""), "🤖🚀");
  for (const delta of deltas) assert(!delta.includes("\uFFFD"));
});

Deno.test("flush releases an incomplete character as U+FFFD", () => {
  const ids = NEOX.encode("🤖");
  assert(ids.length > 1);
  const decoder = new StreamingDecoder(NEOX);
  assertEquals(decoder.push(ids[0]), "");
  assertEquals(decoder.flush(), NEOX.decode([ids[0]]));
  assertEquals(decoder.flush(), "");
});

Deno.test("the streaming decoder emits nothing for an id without a token and throws for -1", () => {
  const ids = NEOX.encode("Hello world");
  const decoder = new StreamingDecoder(NEOX, NEOX.encode("Say:"));
  assertEquals(decoder.push(ids[0]), "Hello");
  assertEquals(decoder.push(50277), "");
  assertThrows(() => decoder.push(-1), RangeError, "Unknown token id -1");
  assertEquals(decoder.push(ids[1]), " world");
  assertThrows(() => new StreamingDecoder(NEOX, [1, -1]), RangeError, "Unknown token id -1");
});

Deno.test("vocabulary size and special ids", () => {
  assertEquals(NEOX.vocabSize, 50277);
  assertEquals(SHAKESPEARE.vocabSize, 2048);
  assertEquals([NEOX.bosTokenId, NEOX.eosTokenId], [0, 0]);
  assertEquals([SHAKESPEARE.bosTokenId, SHAKESPEARE.eosTokenId], [0, 0]);
});

Deno.test("special tokens given as {content} objects, unknown ones, and no config", () => {
  const json = JSONS["tiny-shakespeare"];
  const objects = MambaTokenizer.fromJSON(json, {
    bos_token: { content: "<|endoftext|>", __type: "AddedToken" },
    eos_token: { content: "<|endoftext|>" },
  }, "t.json");
  assertEquals([objects.bosTokenId, objects.eosTokenId], [0, 0]);
  const unknown = MambaTokenizer.fromJSON(json, { eos_token: "</s>" }, "t.json");
  assertEquals(unknown.eosTokenId, undefined);
  const none = MambaTokenizer.fromJSON(json, undefined, "t.json");
  assertEquals([none.bosTokenId, none.eosTokenId], [undefined, undefined]);
  assertEquals(none.encode("Hello world"), CASES["tiny-shakespeare"][0].ids);
});

Deno.test("add_bos_token prepends the BOS id, also to the empty string", () => {
  const tokenizer = MambaTokenizer.fromJSON(
    JSONS["tiny-shakespeare"],
    { ...CONFIGS["tiny-shakespeare"] as object, add_bos_token: true },
    "t.json",
  );
  assertEquals(tokenizer.encode(""), [0]);
  assertEquals(tokenizer.encode("Hello world"), [0, ...CASES["tiny-shakespeare"][0].ids]);
  assertEquals(SHAKESPEARE.encode(""), []);
  assertEquals(SHAKESPEARE.decode([]), "");
});

Deno.test("an id without a token decodes as nothing; a negative or fractional id throws", () => {
  assertEquals(NEOX.decode([12092, 99999]), NEOX.decode([12092]));
  assertEquals(NEOX.decode([50277]), "");
  assertEquals(SHAKESPEARE.decode([2048, 5000]), "");
  assertThrows(() => NEOX.decode([-1]), RangeError, "Unknown token id -1:");
  assertThrows(() => NEOX.decode([1.5]), RangeError, "Unknown token id 1.5:");
  assertThrows(() => NEOX.decode([NaN]), RangeError, "Unknown token id NaN:");
  assertEquals(NEOX.decode([50276]), "  ");
});

Deno.test("vocabularies that cannot work are refused in milliseconds, before building", async (t) => {
  const file = "/models/broken/tokenizer.json";
  const json = JSONS["tiny-shakespeare"] as Record<string, unknown>;
  const model = json.model as Record<string, unknown>;
  const refuse = (tokenizerJson: unknown, includes: string, maxIds?: number) => {
    const start = performance.now();
    const error = assertThrows(
      () => MambaTokenizer.fromJSON(tokenizerJson, undefined, file, maxIds),
      ModelFileError,
    );
    const ms = performance.now() - start;
    assertEquals(error.file, file);
    assertStringIncludes(error.message, includes);
    assert(ms < 500, `refusing took ${ms.toFixed(0)} ms`);
  };
  const vocab = model.vocab as Record<string, number>;
  await t.step("an id of 1e9 or 2^32-2", () => {
    for (const id of [1e9, 2 ** 32 - 2]) {
      refuse({ ...json, model: { ...model, vocab: { ...vocab, huge: id } } }, `has id ${id}`);
    }
  });
  await t.step("an id past the model's rows", () => {
    refuse({ ...json, model: { ...model, vocab: { ...vocab, extra: 2048 } } }, "0 to 2047", 2048);
    refuse({ ...json, added_tokens: [{ id: 3000, content: "x" }] }, "added_tokens[0]", 2048);
    MambaTokenizer.fromJSON(json, undefined, file, 2048);
  });
  await t.step("an empty vocabulary", () => {
    refuse({ ...json, model: { ...model, vocab: {}, merges: [] } }, "vocabulary is empty");
  });
  await t.step("a WordPiece tokenizer", () => {
    refuse(
      { ...json, model: { type: "WordPiece", vocab: { a: 0 }, unk_token: "a" } },
      `Unsupported tokenizer model the string "WordPiece"`,
    );
  });
});

Deno.test("malformed tokenizer files raise a ModelFileError naming the file", async (t) => {
  const file = "/models/broken/tokenizer.json";
  const json = JSONS["tiny-shakespeare"] as Record<string, unknown>;
  const model = json.model as Record<string, unknown>;
  const expectError = (tokenizerJson: unknown, config: unknown, includes: string) => {
    const error = assertThrows(() => MambaTokenizer.fromJSON(tokenizerJson, config, file));
    assertInstanceOf(error, ModelFileError);
    assertEquals(error.file, file);
    assert(error.message.startsWith(`${file}: `), error.message);
    assertStringIncludes(error.message, includes);
  };
  await t.step("not an object", () => {
    expectError(null, undefined, "Expected a JSON object, got null");
    expectError([1, 2], undefined, "Expected a JSON object, got an array");
    expectError("tokenizer", undefined, "Expected a JSON object");
  });
  await t.step("no model", () => {
    expectError({}, undefined, `Expected a "model" object, got none`);
    expectError({ ...json, model: "BPE" }, undefined, `Expected a "model" object`);
  });
  await t.step("a model the library rejects", () => {
    expectError({ ...json, model: { type: "Nonsense" } }, undefined, "Unsupported tokenizer model");
    expectError(
      { ...json, model: { ...model, vocab: undefined, merges: undefined } },
      undefined,
      "Cannot build the tokenizer",
    );
  });
  await t.step("bad added tokens", () => {
    expectError({ ...json, added_tokens: {} }, undefined, "added_tokens");
    expectError(
      { ...json, added_tokens: [{ id: "0", content: "x" }] },
      undefined,
      "added_tokens[0]",
    );
  });
  await t.step("a malformed tokenizer config", () => {
    expectError(json, [], "tokenizer config (tokenizer_config.json) must be a JSON object");
    expectError(json, null, "tokenizer config (tokenizer_config.json) must be a JSON object");
    expectError(json, { eos_token: 5 }, "eos_token must be a string");
    expectError(json, { add_bos_token: "yes" }, "add_bos_token must be true or false");
    expectError(json, { add_bos_token: true, bos_token: "<s>" }, "not in the vocabulary");
  });
});

Deno.test("the real neox file path appears in errors about it", () => {
  const error = assertThrows(
    () => MambaTokenizer.fromJSON(JSONS["gpt-neox-20b"], 42, NEOX_FILE),
    ModelFileError,
  );
  assertStringIncludes(error.message, NEOX_FILE);
});
