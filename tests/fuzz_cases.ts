/**
 * Fuzz cases for issue #18: seeded mutations of a safetensors file, a
 * config.json, a session snapshot and a tokenizer.json, each run against the
 * library and sorted into a class. `tests/fuzz.ts` runs them in child
 * processes (`tests/fuzz_worker.ts`) with a memory and a time cap.
 *
 * A case is a clean rejection when the library throws its own error type
 * (`ModelFileError` naming the file, or `SnapshotError`), a correct acceptance
 * when what was accepted is sound (checked against an independent reading of
 * the input, never against the library's own output), and a failure otherwise.
 *
 * @module
 */

import { ModelFileError } from "../src/errors.ts";
import { loadCheckpoint, loadModel, type Mamba } from "../src/load.ts";
import { MambaTokenizer } from "../src/tokenizer.ts";
import { SnapshotError } from "../src/session.ts";
import { crc32 } from "../src/checksum.ts";
import { SHARED } from "./helpers.ts";

/** The inputs a campaign mutates. */
export type FuzzKind = "safetensors" | "config" | "snapshot" | "tokenizer";

/** Every kind, in campaign order. */
export const FUZZ_KINDS: readonly FuzzKind[] = ["safetensors", "config", "snapshot", "tokenizer"];

/** How one case ended. */
export type FuzzClass = "rejected" | "accepted" | "failure";

/** One case's class and, for a rejection or failure, what happened. */
export interface FuzzOutcome {
  cls: FuzzClass;
  detail: string;
}

const TINY = `${SHARED}/fixtures/hf-oracle/tiny-f32`;
const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;

/** mulberry32: a small seeded generator, so that a case is replayed from (seed, kind, index). */
export function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The generator of case `index` of `kind` in the campaign of `seed`. */
export function caseRandom(seed: number, kind: FuzzKind, index: number): () => number {
  return random(seed * 7919 + FUZZ_KINDS.indexOf(kind) * 1_000_003 + index * 104_729);
}

function int(rand: () => number, n: number): number {
  return Math.floor(rand() * n);
}

function pick<T>(rand: () => number, items: readonly T[]): T {
  return items[int(rand, items.length)];
}

/**
 * A clean rejection: the library's error type, naming the file where there is
 * one (a config contradicting the weights may be reported against the weight
 * file, saying what config.json says: it names both).
 */
function judgeError(error: unknown, fileName: string | null): FuzzOutcome {
  if (fileName !== null && error instanceof ModelFileError) {
    return error.message.includes(fileName)
      ? { cls: "rejected", detail: error.message }
      : { cls: "failure", detail: `ModelFileError naming another file: ${error.message}` };
  }
  if (fileName === null && error instanceof SnapshotError) {
    return { cls: "rejected", detail: error.message };
  }
  const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return { cls: "failure", detail: `unexpected error ${text}` };
}

// ---------------------------------------------------------------- safetensors

/**
 * An independent reading of the safetensors format's rules (the format's
 * reference implementation): the tensor table, or null where the file is
 * invalid. Used to tell a correct acceptance from a misread file.
 */
export function referenceTensors(
  bytes: Uint8Array,
): Map<string, { dtype: string; shape: number[]; begin: number; end: number }> | null {
  const sizes: Record<string, number> = {
    F64: 8,
    F32: 4,
    F16: 2,
    BF16: 2,
    I64: 8,
    I32: 4,
    I16: 2,
    I8: 1,
    U8: 1,
    BOOL: 1,
  };
  if (bytes.length < 8) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (n > bytes.length - 8) return null;
  let header: unknown;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + n));
    if (!text.startsWith("{")) return null;
    header = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) return null;
  const tensors = new Map<string, { dtype: string; shape: number[]; begin: number; end: number }>();
  for (const [name, value] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const { dtype, shape, data_offsets: offsets } = value as Record<string, unknown>;
    if (typeof dtype !== "string" || !(dtype in sizes)) return null;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      return null;
    }
    if (!Array.isArray(offsets) || offsets.length !== 2) return null;
    const [begin, end] = offsets;
    if (!Number.isSafeInteger(begin) || !Number.isSafeInteger(end) || begin > end) return null;
    if (end - begin !== shape.reduce((a: number, b: number) => a * b, 1) * sizes[dtype]) {
      return null;
    }
    tensors.set(name, { dtype, shape, begin, end });
  }
  const spans = [...tensors.values()].sort((a, b) => a.begin - b.begin);
  let covered = 0;
  for (const span of spans) {
    if (span.begin !== covered) return null;
    covered = span.end;
  }
  return covered === bytes.length - 8 - n ? tensors : null;
}

function mutateSafetensors(original: Uint8Array, rand: () => number): Uint8Array {
  const view = new DataView(original.buffer, original.byteOffset, original.byteLength);
  const n = Number(view.getBigUint64(0, true));
  const bytes = original.slice();
  const headerText = () => new TextDecoder().decode(original.subarray(8, 8 + n));
  const withHeader = (text: string): Uint8Array => {
    const head = new TextEncoder().encode(text);
    const out = new Uint8Array(8 + head.length + original.length - 8 - n);
    new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
    out.set(head, 8);
    out.set(original.subarray(8 + n), 8 + head.length);
    return out;
  };
  switch (int(rand, 9)) {
    case 0: { // a flipped bit in the length field or the header
      const at = int(rand, 8 + n);
      bytes[at] ^= 1 << int(rand, 8);
      return bytes;
    }
    case 1: { // a header length a few bytes off
      const delta = (1 + int(rand, 8)) * (rand() < 0.5 ? -1 : 1);
      new DataView(bytes.buffer).setBigUint64(0, BigInt(Math.max(0, n + delta)), true);
      return bytes;
    }
    case 2: // truncated
      return bytes.slice(0, int(rand, bytes.length));
    case 3: { // trailing bytes
      const extra = new Uint8Array(1 + int(rand, 16)).map(() => int(rand, 256));
      const out = new Uint8Array(bytes.length + extra.length);
      out.set(bytes);
      out.set(extra, bytes.length);
      return out;
    }
    case 4: { // a random byte anywhere
      bytes[int(rand, bytes.length)] = int(rand, 256);
      return bytes;
    }
    case 5: { // a number of the header replaced
      const text = headerText();
      const numbers = [...text.matchAll(/\d+/g)];
      const match = pick(rand, numbers);
      const value = Number(match[0]);
      const replacement = pick(rand, [0, 1, value + 1, value - 1, value * 2, 2 ** 53, 4294967296]);
      return withHeader(
        text.slice(0, match.index) + String(replacement) +
          text.slice(match.index! + match[0].length),
      );
    }
    case 6: { // an entry repeated under the same name
      const text = headerText();
      const entries = [...text.matchAll(/"([^"]+)":\{"dtype"[^}]*\}/g)];
      const entry = pick(rand, entries);
      return withHeader(text.replace(/}\s*$/, `,${entry[0]}}`));
    }
    case 7: { // a name with a lone surrogate, escaped or raw
      const text = headerText();
      const names = [...text.matchAll(/"([a-z_.0-9]+)":\{/g)];
      const name = pick(rand, names)[1];
      const bad = rand() < 0.5 ? `${name}\\ud800` : `${name}\\udfff`;
      return withHeader(text.replace(`"${name}":`, `"${bad}":`));
    }
    default: { // NaN or Infinity in the data
      const floats = Math.floor((bytes.length - 8 - n) / 4);
      const at = 8 + n + 4 * int(rand, floats);
      new DataView(bytes.buffer).setFloat32(at, pick(rand, [NaN, Infinity, -Infinity]), true);
      return bytes;
    }
  }
}

async function safetensorsCase(rand: () => number, scratch: string): Promise<FuzzOutcome> {
  const original = await Deno.readFile(`${TINY}/model.safetensors`);
  const bytes = mutateSafetensors(original, rand);
  const dir = `${scratch}/safetensors`;
  await Deno.mkdir(dir, { recursive: true });
  await Deno.copyFile(`${TINY}/config.json`, `${dir}/config.json`);
  await Deno.writeFile(`${dir}/model.safetensors`, bytes);
  let checkpoint;
  try {
    checkpoint = await loadCheckpoint(dir);
  } catch (error) {
    return judgeError(error, "model.safetensors");
  }
  const table = referenceTensors(bytes);
  if (table === null) {
    return { cls: "failure", detail: "accepted a file the format's rules refuse" };
  }
  // Accepted: the embedding must be the bytes the reference reading places there.
  const embedding = table.get("backbone.embeddings.weight");
  if (!embedding || embedding.dtype !== "F32") {
    return { cls: "failure", detail: "accepted without a readable F32 embedding" };
  }
  const dataStart = bytes.length - table.values().reduce((sum, t) => sum + t.end - t.begin, 0);
  const expected = new Float32Array(
    bytes.slice(dataStart + embedding.begin, dataStart + embedding.end).buffer,
  );
  const got = checkpoint.weights.embedding;
  if (got.length !== expected.length || got.some((v, i) => !Object.is(v, expected[i]))) {
    return { cls: "failure", detail: "accepted, but the embedding was misread" };
  }
  if (got.some((v) => !Number.isFinite(v))) {
    return { cls: "failure", detail: "accepted a non-finite weight" };
  }
  return { cls: "accepted", detail: "" };
}

// --------------------------------------------------------------------- config

const CONFIG_VALUES: readonly unknown[] = [
  0,
  -1,
  1,
  2,
  1.5,
  1e-300,
  1e300,
  1e9,
  10_000_000,
  2 ** 31,
  2 ** 53,
  "2",
  "",
  null,
  true,
  [],
  {},
];

function mutateConfig(original: Record<string, unknown>, rand: () => number): string {
  const config: Record<string, unknown> = structuredClone(original);
  const keys = Object.keys(config);
  const key = pick(rand, keys);
  switch (int(rand, 6)) {
    case 0:
      delete config[key];
      break;
    case 1:
      if (typeof config[key] === "number") config[key] = (config[key] as number) * 2;
      else config[key] = pick(rand, CONFIG_VALUES);
      break;
    case 2: { // two keys at once
      config[key] = pick(rand, CONFIG_VALUES);
      config[pick(rand, keys)] = pick(rand, CONFIG_VALUES);
      break;
    }
    case 3: { // cut text
      const text = JSON.stringify(config);
      return text.slice(0, int(rand, text.length));
    }
    case 4:
      return JSON.stringify(pick(rand, [[], null, 7, "config", [config]]));
    default:
      config[key] = pick(rand, CONFIG_VALUES);
  }
  return JSON.stringify(config);
}

const decisions = new Map<string, string>();
const autoDecisions = {
  getItem: (key: string) => decisions.get(key) ?? null,
  setItem: (key: string, value: string) => void decisions.set(key, value),
};

let shakespeare: Mamba | null = null;
async function reference(): Promise<Mamba> {
  return shakespeare ??= await loadModel(SHAKESPEARE, { backend: "js" });
}

async function configCase(rand: () => number, scratch: string): Promise<FuzzOutcome> {
  const original = JSON.parse(await Deno.readTextFile(`${SHAKESPEARE}/config.json`));
  const text = mutateConfig(original, rand);
  const dir = `${scratch}/config`;
  await Deno.mkdir(dir, { recursive: true });
  for (const name of ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]) {
    await Deno.remove(`${dir}/${name}`).catch(() => {});
    await Deno.symlink(`${SHAKESPEARE}/${name}`, `${dir}/${name}`);
  }
  await Deno.writeTextFile(`${dir}/config.json`, text);
  let model: Mamba;
  try {
    // "auto" measures (once per shape in this process), so a config that is not checked
    // against the weights first allocates here, under the worker's memory cap.
    model = await loadModel(dir, { backend: "auto", backendCache: autoDecisions });
  } catch (error) {
    return judgeError(error, "config.json");
  }
  try {
    const logits = await model.session().prefill(model.tokenizer.encode("ROMEO:"));
    if (logits.length !== 2048 || logits.some((v) => !Number.isFinite(v))) {
      return { cls: "failure", detail: "accepted, but the logits are not finite" };
    }
    // An accepted config that changes the arithmetic must match the reference rules:
    // the sizes are the weights', so the sizes can be nothing else.
    const ref = await reference();
    if (JSON.stringify(ref.config.vocabSize) !== JSON.stringify(model.config.vocabSize)) {
      return { cls: "failure", detail: "accepted a vocabulary size the weights contradict" };
    }
    return { cls: "accepted", detail: "" };
  } catch (error) {
    return { cls: "failure", detail: `accepted, then failed: ${error}` };
  }
}

// ------------------------------------------------------------------- snapshot

let snapshotBytes: Uint8Array | null = null;

function reseal(bytes: Uint8Array): Uint8Array {
  if (bytes.length >= 4) {
    new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
      .setUint32(bytes.length - 4, crc32(bytes.subarray(0, bytes.length - 4)), true);
  }
  return bytes;
}

/**
 * A mutated snapshot: `sealed` where the checksum was rewritten after the
 * change (a deliberate edit, judged by its contents), `nonFinite` where a
 * NaN or an infinity was written into it.
 */
interface SnapshotMutation {
  input: unknown;
  sealed: boolean;
  nonFinite: boolean;
}

function mutateSnapshot(original: Uint8Array, rand: () => number): SnapshotMutation {
  const bytes = original.slice();
  const damaged = (input: unknown) => ({ input, sealed: false, nonFinite: false });
  const edited = (input: unknown, nonFinite = false) => ({ input, sealed: true, nonFinite });
  switch (int(rand, 8)) {
    case 0:
      bytes[int(rand, bytes.length)] ^= 1 << int(rand, 8);
      return damaged(bytes);
    case 1: // the checksum rewritten after a flipped bit: the contents are judged
      bytes[int(rand, bytes.length - 4)] ^= 1 << int(rand, 8);
      return edited(reseal(bytes));
    case 2:
      return damaged(bytes.slice(0, int(rand, bytes.length)));
    case 3:
      return edited(reseal(bytes.slice(0, int(rand, bytes.length))));
    case 4: { // a float of the state replaced, checksum rewritten
      const at = 4 * int(rand, Math.floor((bytes.length - 4) / 4));
      const value = pick(rand, [NaN, Infinity, -Infinity, 1e30]);
      new DataView(bytes.buffer).setFloat32(at, value, true);
      return edited(reseal(bytes), !Number.isFinite(value));
    }
    case 5: // other binary forms of the same bytes: to be accepted
      return {
        input: pick(rand, [
          bytes.buffer,
          new DataView(bytes.buffer),
          new Uint8Array([0, ...bytes]).subarray(1),
        ]),
        sealed: true,
        nonFinite: false,
      };
    case 6: // not bytes at all
      return damaged(pick(rand, ["snapshot", 42, null, {}, [1, 2, 3], new Float32Array(8)]));
    default: { // a 32-bit word of the header replaced, checksum rewritten
      const at = 4 * int(rand, 16);
      new DataView(bytes.buffer).setUint32(at, pick(rand, [0, 1, 0xffffffff, 2 ** 31, 4096]), true);
      return edited(reseal(bytes));
    }
  }
}

function sameBytes(input: unknown, original: Uint8Array): boolean {
  if (!(input instanceof ArrayBuffer) && !ArrayBuffer.isView(input)) return false;
  const bytes = input instanceof ArrayBuffer
    ? new Uint8Array(input)
    : new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  return bytes.length === original.length && bytes.every((b, i) => b === original[i]);
}

async function snapshotCase(rand: () => number): Promise<FuzzOutcome> {
  const model = await reference();
  if (!snapshotBytes) {
    const session = model.session();
    await session.prefill(model.tokenizer.encode("ROMEO: What light"));
    snapshotBytes = await session.snapshot();
    session.dispose();
  }
  const { input, sealed, nonFinite } = mutateSnapshot(snapshotBytes, rand);
  let session;
  try {
    // deno-lint-ignore no-explicit-any -- deliberately the wrong types too
    session = model.session(input as any);
    await session.logits();
  } catch (error) {
    return judgeError(error, null);
  }
  try {
    // Damage the checksum does not cover, or a NaN or an infinity, must not get through.
    if (!sealed && !sameBytes(input, snapshotBytes)) {
      return { cls: "failure", detail: "accepted a damaged snapshot" };
    }
    if (nonFinite) return { cls: "failure", detail: "accepted a snapshot holding NaN or Infinity" };
    // A deliberate edit with finite values is a valid snapshot: it must work, although
    // a huge state (1e30) may give non-finite logits, which the format cannot rule out.
    const logits = await session.step(1);
    if (logits.length !== model.config.vocabSize) {
      return { cls: "failure", detail: "accepted, then gave logits of the wrong size" };
    }
    if (!sealed && logits.some((v) => !Number.isFinite(v))) {
      return { cls: "failure", detail: "the unchanged snapshot gives non-finite logits" };
    }
    return { cls: "accepted", detail: "" };
  } catch (error) {
    return { cls: "failure", detail: `accepted, then failed: ${error}` };
  } finally {
    session.dispose();
  }
}

// ------------------------------------------------------------------ tokenizer

function mutateTokenizer(original: Record<string, unknown>, rand: () => number): unknown {
  const json = structuredClone(original) as {
    model: { type: string; vocab: Record<string, number>; merges: unknown[] };
    added_tokens: { id: number; content: string }[];
  } & Record<string, unknown>;
  const tokens = Object.keys(json.model.vocab);
  switch (int(rand, 9)) {
    case 0:
      json.model.vocab[pick(rand, tokens)] = pick(rand, [1e9, 2 ** 32 - 2, -1, 1.5, 2048, 4095]);
      break;
    case 1:
      json.model.vocab = {};
      break;
    case 2:
      json.model.type = pick(rand, ["WordPiece", "Unigram", "WordLevel", "", "bpe"]);
      break;
    case 3:
      json.model.merges = json.model.merges.slice(0, int(rand, 3)).concat(
        pick(rand, [["nonexistent", "pair"], "x", 7, ["a b c"]]),
      );
      break;
    case 4:
      json.added_tokens.push({ ...json.added_tokens[0], id: pick(rand, [1e9, -1, 2047, 5000]) });
      break;
    case 5:
      delete (json as Record<string, unknown>)[pick(rand, Object.keys(json))];
      break;
    case 6:
      (json.model as Record<string, unknown>)[pick(rand, ["vocab", "merges", "type"])] = pick(
        rand,
        CONFIG_VALUES,
      );
      break;
    case 7: { // two tokens on one id
      json.model.vocab[pick(rand, tokens)] = json.model.vocab[pick(rand, tokens)];
      break;
    }
    default:
      return pick(rand, [null, [], "tokenizer", 3]);
  }
  return json;
}

async function tokenizerCase(rand: () => number): Promise<FuzzOutcome> {
  const original = JSON.parse(await Deno.readTextFile(`${SHAKESPEARE}/tokenizer.json`));
  const json = mutateTokenizer(original, rand);
  const file = `${SHAKESPEARE}/tokenizer.json`;
  let tokenizer: MambaTokenizer;
  try {
    tokenizer = MambaTokenizer.fromJSON(json, undefined, file, 2048);
  } catch (error) {
    return judgeError(error, "tokenizer.json");
  }
  try {
    const text = "ROMEO: But soft, what light through yonder window breaks?";
    const ids = tokenizer.encode(text);
    if (ids.length === 0) {
      return { cls: "failure", detail: "accepted, but encodes text to nothing" };
    }
    if (ids.some((id) => !Number.isInteger(id) || id < 0 || id >= 2048)) {
      return { cls: "failure", detail: "accepted, but encodes to ids past the model's rows" };
    }
    tokenizer.decode(ids);
    tokenizer.decode([0, 1, 2047]);
    return { cls: "accepted", detail: "" };
  } catch (error) {
    return { cls: "failure", detail: `accepted, then failed: ${error}` };
  }
}

/** Runs case `index` of `kind` in the campaign of `seed`; `scratch` is a directory it may write. */
export function runCase(
  kind: FuzzKind,
  seed: number,
  index: number,
  scratch: string,
): Promise<FuzzOutcome> {
  const rand = caseRandom(seed, kind, index);
  switch (kind) {
    case "safetensors":
      return safetensorsCase(rand, scratch);
    case "config":
      return configCase(rand, scratch);
    case "snapshot":
      return snapshotCase(rand);
    case "tokenizer":
      return tokenizerCase(rand);
  }
}
