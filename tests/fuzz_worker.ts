/**
 * Child process of the fuzz campaign: `fuzz_worker.ts <kind> <seed> <from> <to> <scratch>`
 * runs cases [from, to) and writes one JSON line before ("start") and after
 * ("done") each, so that the parent knows which case a crash or a hang hit.
 *
 * @module
 */

import { type FuzzKind, runCase } from "./fuzz_cases.ts";

const [kind, seed, from, to, scratch] = Deno.args;
const encoder = new TextEncoder();
const say = (line: unknown) => Deno.stdout.writeSync(encoder.encode(JSON.stringify(line) + "\n"));
for (let index = Number(from); index < Number(to); index++) {
  say({ start: index });
  const outcome = await runCase(kind as FuzzKind, Number(seed), index, scratch);
  say({ done: index, ...outcome });
}
