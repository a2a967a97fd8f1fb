/**
 * `deno task generate` as a user runs it: stdout carries exactly the prompt
 * and the generated text, stderr the statistics; bad flags exit non-zero.
 */

import { assertEquals, assertMatch, assertStringIncludes } from "@std/assert";
import { readSamples, runCli } from "./helpers.ts";

Deno.test("greedy generation on the embedded model prints exactly the expected text", async () => {
  const samples = await readSamples();
  const { code, stdout, stderr } = await runCli([
    "-p",
    samples[1].prompt,
    "-n",
    "48",
    "--temp",
    "0",
    "--backend",
    "js",
  ]);
  assertEquals(code, 0, stderr);
  assertEquals(stdout, samples[1].greedy_text);
  assertMatch(stderr, /^48 tokens, [\d.]+ tok\/s \(prefill [\d.]+ tok\/s\), backend js$/m);
  assertStringIncludes(stderr, "model.safetensors");
});

Deno.test("--help prints the options; bad flags fail with a usage error", async () => {
  const help = await runCli(["--help"]);
  assertEquals(help.code, 0);
  assertStringIncludes(help.stdout, "--max-new-tokens");
  const unknown = await runCli(["--frobnicate"]);
  assertEquals(unknown.code, 2);
  assertStringIncludes(unknown.stderr, "Unknown option --frobnicate");
  const badNumber = await runCli(["-n", "many"]);
  assertEquals(badNumber.code, 2);
  assertStringIncludes(badNumber.stderr, "--max-new-tokens needs an integer");
  const missing = await runCli(["-m", "/nonexistent/model"]);
  assertEquals(missing.code, 1);
  assertStringIncludes(missing.stderr, "/nonexistent/model/config.json: File not found");
});
