/**
 * `deno task generate`: text generation from the command line, with flags in
 * llama.cpp's spirit. stdout carries exactly the prompt followed by the
 * generated text, streamed as it forms; progress and the closing statistics
 * line go to stderr.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { BACKEND_NAMES, type BackendName } from "./backends/registry.ts";
import { formatBackendReport } from "./dispatch.ts";
import { loadModel, type LoadProgress, type Mamba } from "./load.ts";
import { SnapshotError } from "./errors.ts";
import type { Session } from "./session.ts";
import { DEFAULT_MAX_NEW_TOKENS, type GenerateOptions } from "./generate.ts";
import { SAMPLING_DEFAULTS } from "./sampler.ts";

const DEFAULT_MODEL = new URL("../models/tiny-shakespeare/", import.meta.url);
const DEFAULT_PROMPT = "ROMEO:";

const HELP = `Usage: deno task generate [options]

Generates text with a Mamba model. The prompt and the generated text go to
stdout; progress and statistics go to stderr.

Options:
  -m, --model <dir|url|id>    Model directory, file:// or http(s):// URL, or HF repo id
                              (default: the bundled tiny-shakespeare model)
  -p, --prompt <text>         Prompt (default: "${DEFAULT_PROMPT}")
  -f, --file <path>           Read the prompt from a file instead
  -n, --max-new-tokens <n>    Tokens to generate; -1 is no limit: until the end of
                              sequence, a stop string or Ctrl-C (default: ${DEFAULT_MAX_NEW_TOKENS})
      --temp <t>              Temperature; 0 is greedy (default: ${SAMPLING_DEFAULTS.temperature})
      --top-k <k>             Keep the k most likely tokens; 0 is off (default: ${SAMPLING_DEFAULTS.topK})
      --top-p <p>             Nucleus sampling mass; 1 is off (default: ${SAMPLING_DEFAULTS.topP})
      --min-p <p>             Drop tokens below p times the top probability (default: ${SAMPLING_DEFAULTS.minP})
      --repeat-penalty <r>    Repetition penalty; 1 is off (default: ${SAMPLING_DEFAULTS.repetitionPenalty})
      --repeat-last-n <n>     Tokens the penalty looks back over; -1 is all (default: ${SAMPLING_DEFAULTS.repeatLastN})
      --stop <text>           Stop when this text appears (repeatable)
  -s, --seed <n>              Random seed (default: random)
  -t, --threads <n>           CPU threads of the wasm backend (default: all cores)
      --prompt-cache <file>   Keep the state after the prompt in this file and start
                              from it when a later prompt begins with the same text
      --json                  Print one JSON object per token and a final summary
                              object to stdout instead of the text
      --backend <name>        Backend: ${BACKEND_NAMES.join(", ")} (default: auto, which
                              measures the available ones on this model and caches the choice)
      --remeasure             Make auto measure again instead of using its cached choice
  -v, --verbose               Print how the backend was chosen, with its measurements
      --ignore-eos            Keep generating past the end-of-sequence token
  -h, --help                  Show this help
`;

class UsageError extends Error {}

/**
 * `-n -1`: as many tokens as an integer count can say, which no run reaches;
 * the end of sequence, a stop string or Ctrl-C ends the generation first.
 */
const NO_LIMIT = Number.MAX_SAFE_INTEGER;

/** The flags that take a value, by long name, with their short aliases. */
const VALUE_FLAGS = [
  "model",
  "prompt",
  "file",
  "max-new-tokens",
  "temp",
  "top-k",
  "top-p",
  "min-p",
  "repeat-penalty",
  "repeat-last-n",
  "seed",
  "threads",
  "backend",
  "stop",
  "prompt-cache",
] as const;
const ALIASES = {
  m: "model",
  p: "prompt",
  f: "file",
  n: "max-new-tokens",
  s: "seed",
  t: "threads",
  h: "help",
  v: "verbose",
} as const;

/**
 * Joins each value-taking flag with its value (`-n -1` becomes
 * `--max-new-tokens=-1`), so negative numbers and empty strings are values
 * rather than options, and a flag left without a value is reported by name.
 */
function joinValues(args: string[]): string[] {
  const joined: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      joined.push(...args.slice(i));
      break;
    }
    const match = /^(--?)([^=]+)$/.exec(arg);
    const name = match &&
      (match[1] === "-" ? (ALIASES as Record<string, string>)[match[2]] : match[2]);
    if (!name || !(VALUE_FLAGS as readonly string[]).includes(name)) {
      joined.push(arg);
      continue;
    }
    const value = args[i + 1];
    if (value === undefined || (value.startsWith("-") && !/^-[\d.]/.test(value))) {
      throw new UsageError(`${arg} needs a value`);
    }
    joined.push(`--${name}=${value}`);
    i++;
  }
  return joined;
}

/** A numeric flag's accepted range, as a test and the words for the message. */
interface Range {
  integer: boolean;
  accepts(value: number): boolean;
  says: string;
}

const RANGES: Record<string, Range> = {
  "max-new-tokens": {
    integer: true,
    accepts: (v) => v >= -1,
    says: "at least -1 (-1 is no limit)",
  },
  temp: { integer: false, accepts: (v) => v >= 0, says: "at least 0 (0 is greedy)" },
  "top-k": { integer: true, accepts: (v) => v >= 0, says: "at least 0 (0 is off)" },
  "top-p": { integer: false, accepts: (v) => v > 0 && v <= 1, says: "in (0, 1]" },
  "min-p": { integer: false, accepts: (v) => v >= 0 && v <= 1, says: "in [0, 1]" },
  "repeat-penalty": { integer: false, accepts: (v) => v > 0, says: "above 0 (1 is off)" },
  "repeat-last-n": { integer: true, accepts: (v) => v >= -1, says: "at least -1 (-1 is all)" },
  seed: { integer: true, accepts: () => true, says: "an integer" },
  threads: { integer: true, accepts: (v) => v >= 1, says: "at least 1" },
};

function numberFlag(flags: Record<string, unknown>, name: string): number | undefined {
  const raw = flags[name];
  if (raw === undefined) return undefined;
  const range = RANGES[name];
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || (range.integer && !Number.isInteger(value))) {
    throw new UsageError(
      `--${name} needs ${range.integer ? "an integer" : "a number"}, got "${raw}"`,
    );
  }
  if (!range.accepts(value)) throw new UsageError(`--${name} must be ${range.says}, got ${raw}`);
  return value;
}

function progressReporter(): (progress: LoadProgress) => void {
  const encoder = new TextEncoder();
  const interactive = Deno.stderr.isTerminal();
  let lastDraw = 0;
  return ({ file, loaded, total }) => {
    const done = total !== undefined && loaded >= total;
    const mb = (bytes: number) => (bytes / 1e6).toFixed(1);
    if (!interactive) {
      if (done) Deno.stderr.writeSync(encoder.encode(`Loaded ${file} (${mb(loaded)} MB)\n`));
      return;
    }
    const now = performance.now();
    if (!done && now - lastDraw < 100) return;
    lastDraw = now;
    const width = 30;
    const fraction = total ? Math.min(1, loaded / total) : 0;
    const bar = "#".repeat(Math.round(fraction * width)).padEnd(width, "-");
    const size = total ? `${mb(loaded)}/${mb(total)} MB` : `${mb(loaded)} MB`;
    const line = `\r${file} [${bar}] ${Math.round(fraction * 100)}% ${size}\x1b[K`;
    Deno.stderr.writeSync(encoder.encode(done ? `${line}\n` : line));
  };
}

/** Runs the CLI with `args`; returns the exit code (130 after Ctrl-C). */
export async function main(args: string[]): Promise<number> {
  const flags = parseArgs(joinValues(args), {
    string: [...VALUE_FLAGS],
    boolean: ["help", "ignore-eos", "remeasure", "verbose", "json"],
    collect: ["stop"],
    alias: ALIASES,
    unknown: (arg) => {
      if (arg.startsWith("-")) throw new UsageError(`Unknown option ${arg}`);
      throw new UsageError(`Unexpected argument "${arg}": pass the prompt with -p`);
    },
  });
  if (flags.help) {
    console.log(HELP);
    return 0;
  }
  const backend = (flags.backend ?? "auto") as BackendName;
  if (!BACKEND_NAMES.includes(backend)) {
    throw new UsageError(`--backend must be one of ${BACKEND_NAMES.join(", ")}, got "${backend}"`);
  }
  const maxNewTokens = numberFlag(flags, "max-new-tokens");
  const options: GenerateOptions = {
    maxNewTokens: maxNewTokens === -1 ? NO_LIMIT : maxNewTokens,
    temperature: numberFlag(flags, "temp"),
    topK: numberFlag(flags, "top-k"),
    topP: numberFlag(flags, "top-p"),
    minP: numberFlag(flags, "min-p"),
    repetitionPenalty: numberFlag(flags, "repeat-penalty"),
    repeatLastN: numberFlag(flags, "repeat-last-n"),
    seed: numberFlag(flags, "seed"),
    stop: flags.stop,
    ignoreEos: flags["ignore-eos"],
  };
  const threads = numberFlag(flags, "threads");
  if (
    maxNewTokens === -1 && options.repeatLastN === -1 &&
    (options.repetitionPenalty ?? SAMPLING_DEFAULTS.repetitionPenalty) !== 1
  ) {
    // The penalty's window would have to hold every token of an endless run.
    throw new UsageError(
      "--repeat-last-n -1 (every token) needs a limit: give -n a count, or --repeat-last-n a window",
    );
  }
  if (flags.model === "") {
    throw new UsageError("--model is empty: give a directory, URL or repo id");
  }
  if (flags.prompt !== undefined && flags.file !== undefined) {
    throw new UsageError("Give the prompt with -p or -f, not both");
  }
  const prompt = flags.file !== undefined
    ? await readPrompt(flags.file)
    : flags.prompt ?? DEFAULT_PROMPT;
  if (prompt === "") throw new UsageError("The prompt is empty: give some text with -p or -f");

  const source = flags.model ?? DEFAULT_MODEL;
  if (typeof source === "string" && await isRemote(source)) {
    console.error(`fetching ${source} ...`);
  }
  const model = await loadModel(source, {
    backend,
    threads,
    remeasure: flags.remeasure,
    onProgress: progressReporter(),
  });
  if (flags.verbose) console.error(formatBackendReport(model.backendReport()));
  const controller = new AbortController();
  let interrupted = false;
  const onInterrupt = () => {
    interrupted = true;
    controller.abort();
  };
  Deno.addSignalListener("SIGINT", onInterrupt);
  const cachePath = flags["prompt-cache"];
  const generation = cachePath === undefined
    ? model.generate(prompt, { ...options, signal: controller.signal })
    : model.generate([], {
      ...options,
      signal: controller.signal,
      session: await promptSession(model, prompt, cachePath),
    });
  const encoder = new TextEncoder();
  const json = flags.json;
  try {
    if (!json) await writeAll(encoder.encode(prompt));
    for await (const event of generation) {
      if (json) await writeAll(encoder.encode(`${JSON.stringify(event)}\n`));
      else if (event.text) await writeAll(encoder.encode(event.text));
    }
  } catch (error) {
    // A reader that went away (`| head`) ends the run; that is not an error.
    if (!(error instanceof Deno.errors.BrokenPipe)) throw error;
    controller.abort();
    model.dispose();
    return 0;
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
  }
  const stats = generation.stats;
  const { generatedTokens, promptTokens, prefillMs, decodeMs } = stats;
  if (json) {
    const summary = { ...stats, backend: model.backend, text: undefined };
    await writeAll(encoder.encode(`${JSON.stringify(summary)}\n`)).catch(() => {});
  }
  // stdout holds exactly the text; on a terminal, end its line before the statistics.
  if (Deno.stdout.isTerminal()) console.error();
  const rate = (tokens: number, ms: number) => (ms > 0 ? (tokens / ms) * 1000 : 0).toFixed(1);
  console.error(
    `${generatedTokens} tokens, ${rate(generatedTokens, decodeMs)} tok/s (prefill ${
      rate(promptTokens, prefillMs)
    } tok/s), backend ${model.backend}`,
  );
  model.dispose();
  return interrupted ? 130 : 0;
}

/**
 * A session that has read `prompt`, resumed from the snapshot in `path` when
 * that snapshot's tokens begin the prompt; the state after the prompt is
 * written back to `path` for the next run.
 */
async function promptSession(model: Mamba, prompt: string, path: string): Promise<Session> {
  const ids = model.tokenizer.encode(prompt);
  let session = model.session();
  let saved: Uint8Array | null = null;
  try {
    saved = await Deno.readFile(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  if (saved !== null) {
    try {
      const cached = model.session(saved);
      if (cached.tokens.length <= ids.length && cached.tokens.every((id, i) => id === ids[i])) {
        session = cached;
      }
    } catch (error) {
      if (!(error instanceof SnapshotError)) throw error;
      console.error(`prompt cache ${path} is not usable (${error.message}); rewriting it`);
    }
  }
  const reused = session.tokens.length;
  console.error(`prompt cache: ${reused} of ${ids.length} prompt tokens reused`);
  if (reused < ids.length) await session.prefill(ids.slice(reused));
  await Deno.writeFile(path, await session.snapshot());
  return session;
}

async function readPrompt(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new UsageError(`--file ${path}: File not found`);
    }
    throw error;
  }
}

/** Whether loading `source` goes to the network: an http(s) URL or a hub repo id. */
async function isRemote(source: string): Promise<boolean> {
  if (/^https?:/i.test(source)) return true;
  if (!/^[A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*$/.test(source)) return false;
  return !(await isDirectory(source) || await isDirectory(source.split("/")[0]));
}

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

async function writeAll(bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await Deno.stdout.write(bytes.subarray(written));
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    console.error(`error: ${message}`);
    if (error instanceof UsageError) console.error("Run with --help for the options.");
    Deno.exit(error instanceof UsageError ? 2 : 1);
  }
}
