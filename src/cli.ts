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
import { loadModel, type LoadProgress } from "./load.ts";
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
  -n, --max-new-tokens <n>    Tokens to generate (default: ${DEFAULT_MAX_NEW_TOKENS})
      --temp <t>              Temperature; 0 is greedy (default: ${SAMPLING_DEFAULTS.temperature})
      --top-k <k>             Keep the k most likely tokens; 0 is off (default: ${SAMPLING_DEFAULTS.topK})
      --top-p <p>             Nucleus sampling mass; 1 is off (default: ${SAMPLING_DEFAULTS.topP})
      --min-p <p>             Drop tokens below p times the top probability (default: ${SAMPLING_DEFAULTS.minP})
      --repeat-penalty <r>    Repetition penalty; 1 is off (default: ${SAMPLING_DEFAULTS.repetitionPenalty})
      --repeat-last-n <n>     Tokens the penalty looks back over; -1 is all (default: ${SAMPLING_DEFAULTS.repeatLastN})
      --stop <text>           Stop when this text appears (repeatable)
  -s, --seed <n>              Random seed (default: random)
      --backend <name>        Backend: ${BACKEND_NAMES.join(", ")} (default: auto, which
                              measures the available ones on this model and caches the choice)
      --remeasure             Make auto measure again instead of using its cached choice
  -v, --verbose               Print how the backend was chosen, with its measurements
      --ignore-eos            Keep generating past the end-of-sequence token
  -h, --help                  Show this help
`;

class UsageError extends Error {}

function numberFlag(
  flags: Record<string, unknown>,
  name: string,
  integer: boolean,
): number | undefined {
  const raw = flags[name];
  if (raw === undefined) return undefined;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${name} needs ${integer ? "an integer" : "a number"}, got "${raw}"`);
  }
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

/** Runs the CLI with `args`; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const flags = parseArgs(args, {
    string: [
      "model",
      "prompt",
      "max-new-tokens",
      "temp",
      "top-k",
      "top-p",
      "min-p",
      "repeat-penalty",
      "repeat-last-n",
      "seed",
      "backend",
      "stop",
    ],
    boolean: ["help", "ignore-eos", "remeasure", "verbose"],
    collect: ["stop"],
    alias: { m: "model", p: "prompt", n: "max-new-tokens", s: "seed", h: "help", v: "verbose" },
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
  const options: GenerateOptions = {
    maxNewTokens: numberFlag(flags, "max-new-tokens", true),
    temperature: numberFlag(flags, "temp", false),
    topK: numberFlag(flags, "top-k", true),
    topP: numberFlag(flags, "top-p", false),
    minP: numberFlag(flags, "min-p", false),
    repetitionPenalty: numberFlag(flags, "repeat-penalty", false),
    repeatLastN: numberFlag(flags, "repeat-last-n", true),
    seed: numberFlag(flags, "seed", true),
    stop: flags.stop,
    ignoreEos: flags["ignore-eos"],
  };
  const prompt = flags.prompt ?? DEFAULT_PROMPT;

  const model = await loadModel(flags.model ?? DEFAULT_MODEL, {
    backend,
    remeasure: flags.remeasure,
    onProgress: progressReporter(),
  });
  if (flags.verbose) console.error(formatBackendReport(model.backendReport()));
  const controller = new AbortController();
  const onInterrupt = () => controller.abort();
  Deno.addSignalListener("SIGINT", onInterrupt);
  const generation = model.generate(prompt, { ...options, signal: controller.signal });
  const encoder = new TextEncoder();
  try {
    await writeAll(encoder.encode(prompt));
    for await (const event of generation) {
      if (event.text) await writeAll(encoder.encode(event.text));
    }
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
  }
  const { generatedTokens, promptTokens, prefillMs, decodeMs } = generation.stats;
  // stdout holds exactly the text; on a terminal, end its line before the statistics.
  if (Deno.stdout.isTerminal()) console.error();
  const rate = (tokens: number, ms: number) => (ms > 0 ? (tokens / ms) * 1000 : 0).toFixed(1);
  console.error(
    `${generatedTokens} tokens, ${rate(generatedTokens, decodeMs)} tok/s (prefill ${
      rate(promptTokens, prefillMs)
    } tok/s), backend ${model.backend}`,
  );
  return 0;
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
