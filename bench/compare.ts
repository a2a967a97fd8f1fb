/**
 * Compares two `deno bench --json` files (before and after a change):
 *
 * ```sh
 * deno task bench:compare before.json after.json
 * ```
 *
 * For each bench in both files it prints the ratio of mean times
 * (after / before: above 1 is slower) and the run-to-run noise: the range of
 * ratios the iterations allow, from `after.min / before.p75` to
 * `after.p75 / before.min`. A bench is marked a regression only when even the
 * low end of that range is above 1 + `--threshold` (default 0.05), an
 * improvement only when the high end is below 1 − threshold.
 *
 * @module
 */

/** One bench's timing in a `deno bench --json` file, in nanoseconds. */
export interface BenchTiming {
  /** Iterations measured. */
  n: number;
  /** Fastest iteration. */
  min: number;
  /** Mean iteration. */
  avg: number;
  /** 75th percentile iteration. */
  p75: number;
}

/** How one bench changed between two files. */
export interface BenchChange {
  /** `group / name`, or the name alone outside a group. */
  key: string;
  /** Mean time after / mean time before. */
  ratio: number;
  /** The lowest ratio the iterations allow: after.min / before.p75. */
  low: number;
  /** The highest ratio the iterations allow: after.p75 / before.min. */
  high: number;
  /** What the change is beyond the noise. */
  verdict: "regression" | "improvement" | "within noise";
}

/**
 * The timings of a parsed `deno bench --json` file by `group / name`; benches
 * that failed are left out. `file` names the file in errors.
 */
export function readTimings(json: unknown, file: string): Map<string, BenchTiming> {
  const benches = (json as { benches?: unknown })?.benches;
  if (!Array.isArray(benches)) {
    throw new Error(`${file} is not deno bench --json output: it has no "benches" array`);
  }
  const timings = new Map<string, BenchTiming>();
  for (const [index, bench] of benches.entries()) {
    if (typeof bench?.name !== "string") {
      throw new Error(`${file}: benches[${index}] has no name`);
    }
    const key = bench.group ? `${bench.group} / ${bench.name}` : bench.name;
    const ok = bench.results?.[0]?.ok;
    if (!ok) continue;
    for (const field of ["n", "min", "avg", "p75"] as const) {
      if (typeof ok[field] !== "number" || !(ok[field] > 0)) {
        throw new Error(`${file}: bench "${key}" has no positive "${field}"`);
      }
    }
    timings.set(key, { n: ok.n, min: ok.min, avg: ok.avg, p75: ok.p75 });
  }
  return timings;
}

/** The change of every bench present in both `before` and `after`. */
export function compareTimings(
  before: Map<string, BenchTiming>,
  after: Map<string, BenchTiming>,
  threshold = 0.05,
): BenchChange[] {
  const changes: BenchChange[] = [];
  for (const [key, old] of before) {
    const now = after.get(key);
    if (!now) continue;
    const ratio = now.avg / old.avg;
    const low = now.min / old.p75;
    const high = now.p75 / old.min;
    const verdict = low > 1 + threshold
      ? "regression"
      : high < 1 - threshold
      ? "improvement"
      : "within noise";
    changes.push({ key, ratio, low, high, verdict });
  }
  return changes;
}

/** The changes as a text table, one bench a line. */
export function formatChanges(changes: BenchChange[]): string {
  const width = Math.max(5, ...changes.map((change) => change.key.length));
  const lines = [`${"bench".padEnd(width)}  after/before  noise range    verdict`];
  for (const change of changes) {
    const range = `${change.low.toFixed(2)}–${change.high.toFixed(2)}`;
    lines.push(
      `${change.key.padEnd(width)}  ${change.ratio.toFixed(3).padStart(12)}  ${
        range.padEnd(13)
      }  ${change.verdict}`,
    );
  }
  return lines.join("\n");
}

async function readJsonFile(file: string): Promise<unknown> {
  const text = await Deno.readTextFile(file);
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${file} is not JSON: ${(error as Error).message}`);
  }
}

if (import.meta.main) {
  const thresholdFlag = Deno.args.find((arg) => arg.startsWith("--threshold="));
  const files = Deno.args.filter((arg) => !arg.startsWith("--"));
  if (files.length !== 2) {
    console.error("Usage: deno task bench:compare before.json after.json [--threshold=0.05]");
    Deno.exit(2);
  }
  const threshold = thresholdFlag ? Number(thresholdFlag.split("=")[1]) : 0.05;
  if (!(threshold >= 0)) throw new Error(`--threshold must be a non-negative number`);
  const [before, after] = await Promise.all(
    files.map(async (file) => readTimings(await readJsonFile(file), file)),
  );
  const changes = compareTimings(before, after, threshold);
  if (changes.length === 0) throw new Error(`${files[0]} and ${files[1]} share no bench`);
  console.log(formatChanges(changes));
  const regressions = changes.filter((change) => change.verdict === "regression").length;
  if (regressions > 0) {
    console.log(`${regressions} regression(s) beyond the noise`);
    Deno.exit(1);
  }
}
