/**
 * The tokenizer against transformers' reference ids (shared fixtures) for
 * gpt-neox-20b and the bundled tiny-shakespeare model, the streaming decoder,
 * and the errors for unknown ids and malformed files.
 */

import {
  assert,
  assertEquals,
  assertInstanceOf,
  assertRejects,
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
// The same tokenizer with its ByteLevel decoder inside a Sequence: it decodes
// alike, but the streaming decoder then takes its general path (windows of ids).
const NEOX_JSON = JSONS["gpt-neox-20b"] as Record<string, unknown>;
const NEOX_WINDOWS = MambaTokenizer.fromJSON(
  { ...NEOX_JSON, decoder: { type: "Sequence", decoders: [NEOX_JSON.decoder] } },
  CONFIGS["gpt-neox-20b"],
  NEOX_FILE,
);
/** The tokenizers the streaming tests run on, and whose fixture cases they take. */
const STREAMED: [string, MambaTokenizer, Case[]][] = [
  ["gpt-neox-20b", NEOX, CASES["gpt-neox-20b"]],
  ["tiny-shakespeare", SHAKESPEARE, CASES["tiny-shakespeare"]],
  ["gpt-neox-20b decoded in windows", NEOX_WINDOWS, CASES["gpt-neox-20b"]],
];

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
}

for (const [name, tokenizer, cases] of STREAMED) {
  Deno.test(`${name}: streaming every fixture id by id gives decode(ids), never a partial character`, () => {
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

Deno.test("byte-level streaming gives decode(ids) for every id alone and for random runs", () => {
  const neox = NEOX_JSON.model as { vocab: Record<string, number> };
  const added = (NEOX_JSON.added_tokens as { id: number }[]).map((token) => token.id);
  // Single-character tokens past printable ASCII: most stand for one byte of 0x80 or more
  // (UTF-8's lead and continuation bytes, which split characters and break them).
  const bytes = Object.entries(neox.vocab)
    .filter(([token]) => [...token].length === 1 && token.codePointAt(0)! >= 0xa1)
    .map(([, id]) => id);
  assert(added.length > 10 && bytes.length > 50);
  for (let id = 0; id < NEOX.vocabSize + 2; id++) {
    assertEquals(stream(NEOX, [id]).join(""), NEOX.decode([id]), `id ${id}`);
  }
  let seed = 12345;
  const next = (n: number) => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
  const draw = () => {
    const kind = next(10);
    if (kind < 4) return bytes[next(bytes.length)];
    if (kind < 5) return added[next(added.length)];
    if (kind < 6) return NEOX.vocabSize + next(3); // no token: decodes as nothing
    return next(NEOX.vocabSize);
  };
  for (let run = 0; run < 400; run++) {
    const ids = Array.from({ length: 1 + next(24) }, draw);
    assertEquals(stream(NEOX, ids).join(""), NEOX.decode(ids), `ids ${ids}`);
    const split = next(ids.length);
    const prompt = ids.slice(0, split);
    if (!NEOX.decode(prompt).endsWith("\uFFFD")) {
      const continued = NEOX.decode(prompt) + stream(NEOX, ids.slice(split), prompt).join("");
      assertEquals(continued, NEOX.decode(ids), `ids ${ids} after ${split}`);
    }
  }
});

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

Deno.test("a character split between the prompt and the first ids comes out whole", () => {
  const ids = NEOX.encode("Hi 🤖");
  const split = ids.length - 1;
  assert(NEOX.decode(ids.slice(0, split)).endsWith("\uFFFD"), "the prompt ends mid-character");
  for (const tokenizer of [NEOX, NEOX_WINDOWS]) {
    assertEquals(stream(tokenizer, ids.slice(split), ids.slice(0, split)).join(""), "🤖");
  }
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

// encodeInSlices: cutting a text must give exactly the ids of the whole text.

/** Counts event-loop turns (timer ticks) while `work` runs. */
async function turnsDuring<T>(work: () => Promise<T>): Promise<{ result: T; turns: number }> {
  let turns = 0;
  const timer = setInterval(() => turns++, 0);
  try {
    return { result: await work(), turns };
  } finally {
    clearInterval(timer);
  }
}

/**
 * Shakespeare with the whitespace and characters that pre-tokenizers treat
 * specially spliced in: runs of spaces (neox has added tokens for them),
 * blank lines, tabs, spaces before newlines, NFC-composable pairs, emoji,
 * CJK, no-break and other Unicode spaces, and a special token.
 */
function trickyText(source: string): string {
  const inserts = [
    "   ",
    "\n\n\n",
    "\t \t",
    "  \n ",
    "e\u0301",
    "\u00e9t\u00e9",
    "🌹🌹",
    "日本語",
    "\u00a0",
    "\u2000x\u3000",
    "<|endoftext|>",
    " \u200b ",
    "''s 're",
    "1 234 5",
  ];
  const lines = source.split("\n");
  return lines.map((line, i) => i % 3 === 0 ? line + inserts[i % inserts.length] : line).join(
    "\n",
  );
}

const SHAKESPEARE_TEXT = (await Deno.readTextFile(`${SHARED}/data/tinyshakespeare.txt`)).slice(
  0,
  200_000,
);

for (const [name, cases] of Object.entries(CASES)) {
  Deno.test(`${name}: encodeInSlices matches the fixtures, cut at every possible place`, async () => {
    const tokenizer = TOKENIZERS[name];
    for (const { text, ids } of cases) {
      for (const sliceLength of [1, 2, 5]) {
        assertEquals(
          await tokenizer.encodeInSlices(text, { sliceLength }),
          ids,
          `encodeInSlices(${JSON.stringify(text)}, ${sliceLength})`,
        );
      }
    }
  });

  Deno.test(`${name}: encodeInSlices of Shakespeare with odd whitespace and non-ASCII equals encode`, async () => {
    const tokenizer = TOKENIZERS[name];
    const texts = [SHAKESPEARE_TEXT, trickyText(SHAKESPEARE_TEXT.slice(0, 60_000))];
    for (const text of texts) {
      const whole = tokenizer.encode(text);
      for (const sliceLength of [1, 37, 4096]) {
        const { result, turns } = await turnsDuring(() =>
          tokenizer.encodeInSlices(text, { sliceLength })
        );
        assertEquals(result.length, whole.length, `length at sliceLength ${sliceLength}`);
        assertEquals(result, whole, `ids at sliceLength ${sliceLength}`);
        // It really ran in slices: other work ran in between.
        assert(turns > 0, `no event-loop turn at sliceLength ${sliceLength}`);
      }
    }
  });
}

Deno.test("encodeInSlices keeps the BOS id once, in front", async () => {
  const config = { ...(CONFIGS["tiny-shakespeare"] as object), add_bos_token: true };
  const tokenizer = MambaTokenizer.fromJSON(JSONS["tiny-shakespeare"], config, "tokenizer.json");
  const text = SHAKESPEARE_TEXT.slice(0, 5_000);
  const ids = await tokenizer.encodeInSlices(text, { sliceLength: 100 });
  assertEquals(ids, tokenizer.encode(text));
  assertEquals(ids.filter((id) => id === tokenizer.bosTokenId).length, 1);
});

Deno.test("encodeInSlices encodes in one piece where cutting could change the ids", async (t) => {
  const json = JSONS["tiny-shakespeare"] as Record<string, unknown>;
  const preTokenizer = json.pre_tokenizer as Record<string, unknown>;
  const addedTokens = json.added_tokens as Record<string, unknown>[];
  const variants: Record<string, unknown> = {
    "a prefix space (each slice would get one)": {
      ...json,
      pre_tokenizer: { ...preTokenizer, add_prefix_space: true },
    },
    "a normalizer other than NFC": { ...json, normalizer: { type: "Lowercase" } },
    "an added token that strips the whitespace beside it": {
      ...json,
      added_tokens: [{ ...addedTokens[0], rstrip: true }],
    },
    "an added token that spans a word and the space after it": {
      ...json,
      added_tokens: [...addedTokens, { ...addedTokens[0], id: 2047, content: "ROMEO: " }],
    },
  };
  const text = SHAKESPEARE_TEXT.slice(0, 20_000);
  for (const [what, variant] of Object.entries(variants)) {
    await t.step(what, async () => {
      const tokenizer = MambaTokenizer.fromJSON(variant, CONFIGS["tiny-shakespeare"], "t.json");
      const { result, turns } = await turnsDuring(() =>
        tokenizer.encodeInSlices(text, { sliceLength: 16 })
      );
      assertEquals(result, tokenizer.encode(text));
      assertEquals(turns, 0, "one piece: the event loop never turned");
    });
  }
  await t.step("a text without a place to cut", async () => {
    const text = "x".repeat(10_000);
    const { result, turns } = await turnsDuring(() =>
      SHAKESPEARE.encodeInSlices(text, { sliceLength: 16 })
    );
    assertEquals(result, SHAKESPEARE.encode(text));
    assertEquals(turns, 0);
  });
});

Deno.test("encodeInSlices refuses a slice length that is not a positive integer", async () => {
  for (const sliceLength of [0, -1, 1.5, NaN]) {
    const error = await assertRejects(() => SHAKESPEARE.encodeInSlices("ab", { sliceLength }));
    assertInstanceOf(error, RangeError);
    assertStringIncludes(error.message, "sliceLength");
  }
});
