/**
 * The CI slice of the fuzz campaign (issue #18): seeded, bounded mutations of
 * each input the library reads, each case in a child process with a heap and
 * a time cap (see `tests/fuzz.ts`; `deno task fuzz` runs a long campaign).
 * Every case must end in a clean rejection or a correct acceptance.
 */

import { assertEquals } from "@std/assert";
import { fuzzKind } from "./fuzz.ts";
import type { FuzzKind } from "./fuzz_cases.ts";

const SEED = 18;
const SLICE: Record<FuzzKind, number> = {
  safetensors: 1000,
  config: 100,
  snapshot: 200,
  tokenizer: 50,
};

for (const [kind, cases] of Object.entries(SLICE) as [FuzzKind, number][]) {
  Deno.test(`fuzz: ${cases} ${kind} mutations end in a clean rejection or a correct acceptance`, async () => {
    const report = await fuzzKind(kind, SEED, cases);
    console.log(`${kind}: ${JSON.stringify(report.counts)}`);
    assertEquals(report.failures, []);
    assertEquals(report.counts.rejected + report.counts.accepted, cases);
  });
}
