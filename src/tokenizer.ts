/**
 * The tokenizer of a Mamba model: HF `tokenizer.json` (+ `tokenizer_config.json`)
 * through `@huggingface/tokenizers`, with strict id checks, and a
 * {@link StreamingDecoder} that turns generated ids into text deltas that are
 * always complete UTF-8.
 *
 * @example Encode, decode and stream
 * ```ts
 * import { MambaTokenizer, StreamingDecoder } from "./tokenizer.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const dir = new URL("../models/tiny-shakespeare/", import.meta.url);
 * const read = async (name: string) => JSON.parse(await Deno.readTextFile(new URL(name, dir)));
 * const tokenizer = MambaTokenizer.fromJSON(
 *   await read("tokenizer.json"),
 *   await read("tokenizer_config.json"),
 *   new URL("tokenizer.json", dir).href,
 * );
 * const ids = tokenizer.encode("ROMEO: 🌹");
 * assertEquals(tokenizer.decode(ids), "ROMEO: 🌹");
 *
 * const decoder = new StreamingDecoder(tokenizer);
 * let text = "";
 * for (const id of ids) text += decoder.push(id); // "" while the rose is half-decoded
 * text += decoder.flush();
 * assertEquals(text, "ROMEO: 🌹");
 * ```
 *
 * @module
 */

// A full specifier: the library is imported by URL, where no import map applies.
// deno-lint-ignore no-import-prefix
import { ByteLevelDecoder, Tokenizer } from "npm:@huggingface/tokenizers@0.2.0";
import { checkPositiveInteger, ModelFileError } from "./errors.ts";
import { yieldToEventLoop } from "./yield.ts";

/** Keys of tokenizer_config.json that name a special token (a string or `{content}`). */
const SPECIAL_TOKEN_KEYS = [
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
] as const;

/** Keys the library requires in tokenizer.json; a missing one means "none". */
const OPTIONAL_COMPONENTS = ["normalizer", "pre_tokenizer", "post_processor", "decoder"] as const;

/** Characters per slice of {@link MambaTokenizer.encodeInSlices} by default (1–3 ms of work). */
const SLICE_LENGTH = 1024;

/** Token ids accepted when the caller names no model: far past any real vocabulary. */
const MAX_TOKEN_IDS = 1 << 24;

/**
 * Checks the vocabulary in one pass before the library builds anything (it
 * sizes arrays by the largest id, so one huge id would stall it): BPE only, at
 * least one token, every id an integer in [0, maxIds).
 */
function checkVocabulary(
  model: Record<string, unknown>,
  addedTokens: readonly unknown[],
  maxIds: number,
  file: string,
): void {
  if (model.type !== undefined && model.type !== "BPE") {
    throw new ModelFileError(
      file,
      `Unsupported tokenizer model ${describe(model.type)}: only BPE (as Mamba checkpoints use) ` +
        `is supported`,
    );
  }
  if (!isObject(model.vocab)) {
    throw new ModelFileError(
      file,
      `Cannot build the tokenizer: "model.vocab" must be an object, got ${describe(model.vocab)}`,
    );
  }
  const checkId = (id: unknown, what: string) => {
    if (!Number.isInteger(id) || (id as number) < 0 || (id as number) >= maxIds) {
      throw new ModelFileError(
        file,
        `${what} has id ${
          typeof id === "number" ? id : describe(id)
        }; ids must be integers from 0 to ${maxIds - 1} ` +
          `(the model's embedding rows)`,
      );
    }
  };
  let count = 0;
  for (const token in model.vocab) {
    checkId(model.vocab[token], `Vocabulary token ${JSON.stringify(token)}`);
    count++;
  }
  if (count === 0) throw new ModelFileError(file, "The vocabulary is empty");
  addedTokens.forEach((token, i) => checkId((token as { id: unknown }).id, `added_tokens[${i}]`));
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return `the string ${JSON.stringify(value)}`;
  return `${typeof value === "object" ? "an" : "a"} ${typeof value} (${String(value)})`;
}

/** A special token as tokenizer_config.json writes it: a string, `{content}`, or null. */
function tokenContent(value: unknown, key: string, file: string): string | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value === "string") return value;
  if (isObject(value) && typeof value.content === "string") return value.content;
  throw new ModelFileError(
    file,
    `The tokenizer config's ${key} must be a string or an object with a string "content", got ${
      describe(value)
    }`,
  );
}

/**
 * Whether texts may be cut before a space or newline that follows a
 * non-whitespace character and encoded piece by piece, giving exactly the ids
 * of the whole text. This holds for GPT-NeoX's setup: an NFC normalizer (or
 * none; NFC never composes a character with following whitespace), the
 * byte-level pre-tokenizer without a prefix space, whose regex never puts a
 * non-whitespace character and the whitespace after it in one piece (its
 * lookahead `\s+(?!\S)` reads only rightwards, from whitespace), and added
 * tokens that cannot straddle such a cut nor strip the whitespace beside
 * them. Anything else is encoded in one piece.
 */
function canSlice(json: Record<string, unknown>, config: Record<string, unknown>): boolean {
  const normalizer = json.normalizer as Record<string, unknown> | null;
  const preTokenizer = json.pre_tokenizer as Record<string, unknown> | null;
  const addedTokens = json.added_tokens as Record<string, unknown>[];
  return (normalizer === null || normalizer.type === "NFC") &&
    preTokenizer?.type === "ByteLevel" && preTokenizer.add_prefix_space !== true &&
    preTokenizer.use_regex !== false && config.remove_space !== true &&
    addedTokens.every((token) =>
      token.lstrip !== true && token.rstrip !== true && token.single_word !== true &&
      !/\S\s/u.test(token.content as string)
    );
}

/**
 * A Mamba model's tokenizer. Build one with {@link MambaTokenizer.fromJSON}.
 *
 * Encoding adds no special tokens unless tokenizer_config.json sets
 * `add_bos_token: true` (then the BOS id is prepended). Decoding keeps special
 * tokens and applies the config's `clean_up_tokenization_spaces` only when it
 * is explicitly `true`, so by default `decode(encode(text)) === text` for
 * byte-level BPE tokenizers.
 */
export class MambaTokenizer {
  /** Number of ids the tokenizer knows: the largest id + 1, added tokens included. */
  readonly vocabSize: number;
  /** The end-of-sequence id (tokenizer_config's `eos_token`), if it names a known token. */
  readonly eosTokenId: number | undefined;
  /** The beginning-of-sequence id (tokenizer_config's `bos_token`), if it names a known token. */
  readonly bosTokenId: number | undefined;
  /** The path or URL the tokenizer came from, for messages. */
  get file(): string {
    return this.#file;
  }

  readonly #tokenizer: Tokenizer;
  readonly #file: string;
  readonly #addBos: boolean;
  readonly #cleanUp: boolean;
  /** known[id] is 1 when id has a token (vocabularies may have holes). */
  readonly #known: Uint8Array;
  /** Whether {@link encodeInSlices} may cut texts (see canSlice). */
  readonly #sliceable: boolean;

  private constructor(
    tokenizer: Tokenizer,
    file: string,
    config: Record<string, unknown>,
    sliceable: boolean,
  ) {
    this.#tokenizer = tokenizer;
    this.#file = file;
    this.#sliceable = sliceable;
    const vocab = tokenizer.model?.vocab ?? [];
    this.vocabSize = vocab.length;
    this.#known = new Uint8Array(vocab.length);
    for (let id = 0; id < vocab.length; id++) {
      if (typeof vocab[id] === "string") this.#known[id] = 1;
    }
    const idOf = (token: unknown) => {
      if (typeof token !== "string") return undefined;
      const id = tokenizer.token_to_id(token);
      return id !== undefined && this.#isKnown(id) ? id : undefined;
    };
    this.bosTokenId = idOf(config.bos_token);
    this.eosTokenId = idOf(config.eos_token);
    this.#addBos = config.add_bos_token === true;
    this.#cleanUp = config.clean_up_tokenization_spaces === true;
    if (this.#addBos && this.bosTokenId === undefined) {
      throw new ModelFileError(
        file,
        `The tokenizer config sets add_bos_token but its bos_token (${
          describe(config.bos_token)
        }) is not in the vocabulary`,
      );
    }
  }

  /**
   * Builds a tokenizer from the parsed contents of `tokenizer.json` and, if
   * there is one, `tokenizer_config.json` (pass `undefined` otherwise).
   *
   * @param tokenizerJson The parsed tokenizer.json.
   * @param tokenizerConfig The parsed tokenizer_config.json, or `undefined`.
   * @param file Path or URL of tokenizer.json, used in error messages.
   * @param maxIds The model's embedding rows: a token id at or past it is
   *   refused before anything is built (default 2^24).
   * @throws {ModelFileError} When either object is malformed, the model is not
   *   BPE, the vocabulary is empty or names an id past `maxIds`, or the library
   *   rejects it.
   */
  static fromJSON(
    tokenizerJson: unknown,
    tokenizerConfig: unknown | undefined,
    file: string,
    maxIds: number = MAX_TOKEN_IDS,
  ): MambaTokenizer {
    if (!isObject(tokenizerJson)) {
      throw new ModelFileError(file, `Expected a JSON object, got ${describe(tokenizerJson)}`);
    }
    if (!isObject(tokenizerJson.model)) {
      throw new ModelFileError(
        file,
        `Expected a "model" object, got ${
          "model" in tokenizerJson ? describe(tokenizerJson.model) : "none"
        }`,
      );
    }
    const addedTokens = tokenizerJson.added_tokens ?? [];
    if (!Array.isArray(addedTokens)) {
      throw new ModelFileError(
        file,
        `"added_tokens" must be an array, got ${describe(addedTokens)}`,
      );
    }
    addedTokens.forEach((token, i) => {
      if (
        !isObject(token) || !Number.isInteger(token.id) || (token.id as number) < 0 ||
        typeof token.content !== "string"
      ) {
        throw new ModelFileError(
          file,
          `added_tokens[${i}] must have a non-negative integer "id" and a string "content"`,
        );
      }
    });
    checkVocabulary(tokenizerJson.model, addedTokens, maxIds, file);
    const json: Record<string, unknown> = { ...tokenizerJson, added_tokens: addedTokens };
    for (const key of OPTIONAL_COMPONENTS) json[key] ??= null;

    if (tokenizerConfig !== undefined && !isObject(tokenizerConfig)) {
      throw new ModelFileError(
        file,
        `The tokenizer config (tokenizer_config.json) must be a JSON object, got ${
          describe(tokenizerConfig)
        }`,
      );
    }
    const config: Record<string, unknown> = { ...tokenizerConfig };
    for (const key of SPECIAL_TOKEN_KEYS) {
      const content = tokenContent(config[key], key, file);
      if (content === undefined) delete config[key];
      else config[key] = content;
    }
    if (config.additional_special_tokens !== undefined) {
      if (!Array.isArray(config.additional_special_tokens)) {
        throw new ModelFileError(
          file,
          `The tokenizer config's additional_special_tokens must be an array, got ${
            describe(config.additional_special_tokens)
          }`,
        );
      }
      config.additional_special_tokens = config.additional_special_tokens.map((token, i) =>
        tokenContent(token, `additional_special_tokens[${i}]`, file)
      ).filter((token) => token !== undefined);
    }
    for (const key of ["add_bos_token", "clean_up_tokenization_spaces"]) {
      if (config[key] !== undefined && typeof config[key] !== "boolean") {
        throw new ModelFileError(
          file,
          `The tokenizer config's ${key} must be true or false, got ${describe(config[key])}`,
        );
      }
    }

    let tokenizer: Tokenizer;
    try {
      tokenizer = new Tokenizer(json, config);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new ModelFileError(file, `Cannot build the tokenizer: ${message}`, { cause: error });
    }
    if (!Array.isArray(tokenizer.model?.vocab)) {
      throw new ModelFileError(file, "Cannot build the tokenizer: the model has no vocabulary");
    }
    const result = new MambaTokenizer(tokenizer, file, config, canSlice(json, config));
    if (isByteLevel(json, config)) {
      // The streaming decoder then takes each id's piece (see ByteLevelPieces).
      const added = addedTokens as { content: string }[];
      byteLevelPieces.set(result, new ByteLevelPieces(tokenizer.model.vocab, added));
    }
    return result;
  }

  /**
   * Turns text into ids. No special tokens are added, except the BOS id when
   * tokenizer_config.json sets `add_bos_token: true`. Special tokens written
   * in the text (e.g. `<|endoftext|>`) become their ids.
   */
  encode(text: string): number[] {
    const ids = this.#addBos ? [this.bosTokenId as number] : [];
    return this.#encodeInto(text, ids);
  }

  /**
   * Gives exactly the ids of {@link encode}, but encodes a long text in
   * slices of about `sliceLength` characters and lets the event loop run
   * between them, so that a server's other requests and streams keep going.
   * A slice ends only before a space or newline that follows a
   * non-whitespace character, where the byte-level pre-tokenizer splits
   * anyway; a text without such a place, or a tokenizer set up otherwise
   * than byte-level BPE (as GPT-NeoX's), is encoded in one piece.
   *
   * @example Encode a long text without holding the thread
   * ```ts
   * import { loadModel } from "../mod.ts";
   * import { assertEquals } from "@std/assert";
   *
   * await using model = await loadModel(new URL("../models/tiny-shakespeare/", import.meta.url), {
   *   backend: "js",
   * });
   * const text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n".repeat(500);
   * const ids = await model.tokenizer.encodeInSlices(text, { sliceLength: 1000 });
   * assertEquals(ids, model.tokenizer.encode(text));
   * ```
   *
   * @param text The text to encode.
   * @param options `sliceLength`: characters per slice before it is cut at
   *   the next possible place (default 1024, 1–3 ms of work).
   * @throws {ModelFileError} As {@link encode} does.
   * @throws {RangeError} When `sliceLength` is not a positive integer.
   */
  async encodeInSlices(
    text: string,
    options: { sliceLength?: number } = {},
  ): Promise<number[]> {
    const sliceLength = checkPositiveInteger("sliceLength", options.sliceLength ?? SLICE_LENGTH);
    if (!this.#sliceable) return this.encode(text);
    const ids = this.#addBos ? [this.bosTokenId as number] : [];
    let start = 0;
    while (start < text.length) {
      const end = nextCut(text, start + sliceLength);
      this.#encodeInto(text.slice(start, end), ids);
      start = end;
      if (start < text.length) await yieldToEventLoop();
    }
    return ids;
  }

  /** Appends the ids of `text` (no special tokens added) to `ids` and returns it. */
  #encodeInto(text: string, ids: number[]): number[] {
    if (text.length === 0) return ids;
    const encoding = this.#tokenizer.encode(text, { add_special_tokens: false });
    for (let i = 0; i < encoding.ids.length; i++) {
      const id = encoding.ids[i];
      if (!Number.isInteger(id)) {
        throw new ModelFileError(
          this.#file,
          `Cannot encode ${JSON.stringify(encoding.tokens[i])}: it is not in the vocabulary and ` +
            "there is no unknown token",
        );
      }
      ids.push(id);
    }
    return ids;
  }

  /**
   * Turns ids back into text, special tokens included. An id without a token
   * (a hole in the vocabulary, or an embedding row past it, which a model may
   * still produce) decodes as nothing.
   *
   * @throws {RangeError} For an id that is negative or not an integer.
   */
  decode(ids: readonly number[]): string {
    for (const id of ids) checkId(id);
    const known = ids.filter((id) => this.#isKnown(id));
    if (known.length === 0) return "";
    return this.#tokenizer.decode(known, {
      clean_up_tokenization_spaces: this.#cleanUp,
    });
  }

  #isKnown(id: number): boolean {
    return Number.isInteger(id) && id >= 0 && id < this.vocabSize && this.#known[id] === 1;
  }
}

/** Throws the RangeError of {@link MambaTokenizer.decode} for an id that is negative or not an integer. */
function checkId(id: number): void {
  if (Number.isInteger(id) && id >= 0) return;
  throw new RangeError(`Unknown token id ${id}: token ids are non-negative integers`);
}

/**
 * Whether the library decodes ids as byte-level BPE does, piece by piece: a
 * ByteLevel decoder on its own, no end-of-word suffix and no clean-up of
 * spaces (which looks across tokens).
 */
function isByteLevel(json: Record<string, unknown>, config: Record<string, unknown>): boolean {
  const decoder = json.decoder as Record<string, unknown> | null;
  const model = json.model as Record<string, unknown>;
  return decoder?.type === "ByteLevel" && !model.end_of_word_suffix &&
    config.clean_up_tokenization_spaces !== true;
}

/** The library's own table from the characters of byte-level tokens to the bytes they stand for. */
const BYTE_OF_CHAR: Readonly<Record<string, number>> =
  new ByteLevelDecoder({ type: "ByteLevel" }).byte_decoder;

/**
 * What each id adds to a byte-level decode, as the library builds it: the
 * bytes its token's characters stand for (a character outside the table as
 * 0, as the library's Uint8Array makes it), or, for a token whose text is an
 * added token's, that text itself, which ends the bytes before it. Built per
 * id on first use.
 */
class ByteLevelPieces {
  readonly #vocab: readonly unknown[];
  readonly #added: ReadonlySet<string>;
  /**
   * Each id's piece, undefined until built. Sized and filled up front: scattered
   * writes into an empty array would leave it in slow dictionary elements.
   */
  readonly #pieces: (Uint8Array | string | null | undefined)[];

  constructor(vocab: readonly unknown[], addedTokens: readonly { content: string }[]) {
    this.#vocab = vocab;
    this.#added = new Set(addedTokens.map((token) => token.content));
    this.#pieces = new Array(vocab.length).fill(undefined);
  }

  /** The piece of `id`; null for an id without a token, which decodes as nothing. */
  of(id: number): Uint8Array | string | null {
    checkId(id);
    let piece = this.#pieces[id];
    if (piece === undefined) {
      const token = this.#vocab[id];
      if (typeof token !== "string") piece = null;
      else if (this.#added.has(token)) piece = token;
      else piece = Uint8Array.from(token, (char) => BYTE_OF_CHAR[char] ?? 0);
      if (id < this.#vocab.length) this.#pieces[id] = piece;
    }
    return piece;
  }
}

/** The pieces of each tokenizer whose decoding is byte-level (see isByteLevel). */
const byteLevelPieces = new WeakMap<MambaTokenizer, ByteLevelPieces>();

/**
 * The first place at or after `from` where a text may be cut (see canSlice):
 * before a space or newline that follows a non-whitespace character; the
 * text's length when there is none.
 */
function nextCut(text: string, from: number): number {
  for (let i = Math.max(from, 1); i < text.length; i++) {
    const code = text.charCodeAt(i);
    if ((code === 0x20 || code === 0x0a) && !/\s/u.test(text[i - 1])) return i;
  }
  return text.length;
}

/** Prompt ids kept as context for the first generated token. */
const PROMPT_CONTEXT = 5;

/**
 * Turns a stream of ids into text deltas that are always complete UTF-8.
 *
 * Byte-level BPE can split one character across several tokens; the text is
 * held back until the character is complete (or {@link StreamingDecoder.flush}
 * releases it). Where decoding is byte-level (GPT-NeoX's tokenizer), each id's
 * bytes go through a streaming UTF-8 decoder; otherwise each delta is the
 * difference between decoding a short window of ids with and without the new
 * ones, so context-dependent decoders (leading spaces) come out right. Either
 * way the cost per id stays constant.
 *
 * Concatenating every `push` and the final `flush` gives `decode(ids)`,
 * exactly when the tokenizer does not clean up tokenization spaces (the
 * default): with clean-up on, a space already streamed cannot be taken back.
 */
export class StreamingDecoder {
  readonly #stream: IdStream;

  /**
   * Starts a stream, optionally after prompt ids.
   *
   * @param tokenizer The tokenizer the ids come from.
   * @param promptIds Ids before the first pushed one: their tail gives
   *   context (e.g. for leading-space handling) but their text is not emitted.
   * @throws {RangeError} For a prompt id the tokenizer does not know.
   */
  constructor(tokenizer: MambaTokenizer, promptIds: readonly number[] = []) {
    const context = promptIds.slice(Math.max(0, promptIds.length - PROMPT_CONTEXT));
    const pieces = byteLevelPieces.get(tokenizer);
    this.#stream = pieces ? new ByteStream(pieces, context) : new WindowStream(tokenizer, context);
  }

  /**
   * Adds one id; returns the text it completes, possibly "" while a character
   * is still split.
   *
   * @throws {RangeError} For an id the tokenizer does not know (nothing is added).
   */
  push(id: number): string {
    return this.#stream.push(id);
  }

  /** Returns whatever is held back (an incomplete character comes out as U+FFFD). */
  flush(): string {
    return this.#stream.flush();
  }
}

/** A {@link StreamingDecoder}'s way of turning ids into text deltas. */
interface IdStream {
  push(id: number): string;
  flush(): string;
}

/**
 * Byte-level decoding, id by id: each id's bytes go into a streaming UTF-8
 * decoder, which holds back a character split across tokens until it is
 * complete. The library decodes the same bytes in one call per run between
 * added tokens, and a streaming decoder's chunks add up to that call's output
 * (the Encoding standard); an added token's text ends the run before it, as
 * in the library. A delta costs a lookup rather than two decodes of a window,
 * which a server streaming hundreds of sequences feels (docs/performance.md).
 */
class ByteStream implements IdStream {
  readonly #pieces: ByteLevelPieces;
  // As the library's: U+FFFD for invalid bytes, a byte order mark kept as text.
  readonly #utf8 = new TextDecoder("utf-8", { ignoreBOM: true });

  /** `context`: the prompt's last ids, whose text is not emitted (they may start a character). */
  constructor(pieces: ByteLevelPieces, context: readonly number[]) {
    this.#pieces = pieces;
    for (const id of context) this.push(id);
  }

  push(id: number): string {
    const piece = this.#pieces.of(id);
    if (piece === null) return "";
    if (typeof piece === "string") return this.#utf8.decode() + piece;
    return this.#utf8.decode(piece, { stream: true });
  }

  flush(): string {
    return this.#utf8.decode();
  }
}

/**
 * Any other decoding: each delta is what decoding a short window of ids with
 * the new one adds to decoding it without; while that ends with U+FFFD the
 * text is held back.
 */
class WindowStream implements IdStream {
  readonly #tokenizer: MambaTokenizer;
  /** Ids from the start of the context window on. */
  #ids: number[];
  /** Ids of #ids already turned into text. */
  #read: number;
  /** The decode of #ids[0, #read). */
  #prefixText: string;

  /** `context`: the prompt's last ids, whose text is not emitted. */
  constructor(tokenizer: MambaTokenizer, context: number[]) {
    this.#tokenizer = tokenizer;
    this.#ids = context;
    this.#read = this.#ids.length;
    this.#prefixText = tokenizer.decode(this.#ids);
  }

  push(id: number): string {
    const text = this.#tokenizer.decode([...this.#ids, id]);
    this.#ids.push(id);
    if (text.endsWith("\uFFFD")) return "";
    return this.#advance(text);
  }

  flush(): string {
    if (this.#read === this.#ids.length) return "";
    return this.#advance(this.#tokenizer.decode(this.#ids));
  }

  /** Emits what `text` (the decode of #ids) adds to #prefixText and slides the window. */
  #advance(text: string): string {
    let delta: string;
    if (text.startsWith(this.#prefixText)) {
      delta = text.slice(this.#prefixText.length);
    } else {
      // The new ids changed already-decoded text (e.g. completed a character
      // split at the end of the prompt): emit from where the two differ.
      let common = 0;
      const max = Math.min(text.length, this.#prefixText.length);
      while (common < max && text.charCodeAt(common) === this.#prefixText.charCodeAt(common)) {
        common++;
      }
      const code = text.charCodeAt(common - 1);
      if (common > 0 && code >= 0xd800 && code <= 0xdbff) common--;
      delta = text.slice(common);
    }
    this.#ids = this.#ids.slice(this.#read);
    this.#read = this.#ids.length;
    this.#prefixText = this.#tokenizer.decode(this.#ids);
    return delta;
  }
}
