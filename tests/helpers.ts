/** Shared helpers of the test files. */

/** The shared reference data, next to the project checkout. */
export const SHARED = new URL("../../shared", import.meta.url).pathname;

/** One prompt of the tiny-shakespeare reference and its 48-token greedy continuation. */
export interface Sample {
  prompt: string;
  greedy_text: string;
}

/** The samples of `../shared/models/tiny-shakespeare/expected.json`. */
export async function readSamples(): Promise<Sample[]> {
  const path = `${SHARED}/models/tiny-shakespeare/expected.json`;
  return JSON.parse(await Deno.readTextFile(path)).samples;
}

/** Largest |a[i] - b[i]|; lengths must match. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`Length mismatch: ${a.length} vs ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return Number.isNaN(max) ? Infinity : max;
}

/**
 * Largest |a[i] - b[i]| / max(|b[i]|, 1e-3): relative error, with an absolute
 * floor so values near zero do not dominate.
 */
export function maxRelDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`Length mismatch: ${a.length} vs ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const diff = Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), 1e-3);
    if (!(diff <= max)) max = Number.isNaN(diff) ? Infinity : diff;
  }
  return max;
}

export const CLI = new URL("../src/cli.ts", import.meta.url).pathname;

/** Runs `deno task generate` with `args` as a user would; returns its exit code and output. */
export async function runCli(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-net", CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...env },
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}
