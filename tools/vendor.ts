/**
 * Refreshes `vendor/`, the committed copy of the few `@std` modules the
 * project imports, so that `deno task generate` and `deno task test` work on a
 * machine that cannot reach jsr.io (deno.json sets `"vendor": true`).
 *
 * - `deno task vendor` fetches the modules and rewrites `vendor/jsr.io/`.
 * - `deno task vendor --check` fetches them into a temporary folder and fails
 *   if the committed tree differs (CI runs it, like the generated files).
 *
 * It needs a JSR registry: jsr.io, or a mirror named by `JSR_URL`. Deno files
 * a mirror's modules under the mirror's host name; they are stored here under
 * `jsr.io/`, where Deno looks for `jsr:` modules without `JSR_URL`.
 *
 * @module
 */

const ROOT = new URL("../", import.meta.url);
const SOURCE_DIRS = ["src", "tests", "bench", "examples"];
const ROOT_FILES = ["mod.ts", "advanced.ts"];
const STD_IMPORT = /["'](@std\/[a-z0-9_/-]+)["']/g;

async function* typeScriptFiles(dir: URL): AsyncGenerator<URL> {
  for await (const entry of Deno.readDir(dir)) {
    const url = new URL(entry.name + (entry.isDirectory ? "/" : ""), dir);
    if (entry.isDirectory) yield* typeScriptFiles(url);
    else if (entry.name.endsWith(".ts")) yield url;
  }
}

/** The `@std/...` specifiers imported anywhere, JSDoc examples included. */
async function stdSpecifiers(): Promise<string[]> {
  const files = ROOT_FILES.map((name) => new URL(name, ROOT));
  for (const dir of SOURCE_DIRS) {
    for await (const file of typeScriptFiles(new URL(`${dir}/`, ROOT))) files.push(file);
  }
  const found = new Set<string>();
  for (const file of files) {
    for (const match of (await Deno.readTextFile(file)).matchAll(STD_IMPORT)) found.add(match[1]);
  }
  return [...found].sort();
}

/** Relative path -> bytes of every file under `dir` (empty when it is missing). */
async function readTree(dir: string): Promise<Map<string, Uint8Array>> {
  const tree = new Map<string, Uint8Array>();
  async function walk(path: string, prefix: string) {
    for await (const entry of Deno.readDir(path)) {
      const full = `${path}/${entry.name}`;
      if (entry.isDirectory) await walk(full, `${prefix}${entry.name}/`);
      else tree.set(`${prefix}${entry.name}`, await Deno.readFile(full));
    }
  }
  try {
    await walk(dir, "");
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return tree;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

/** Vendors the imported `@std` modules in a scratch project; returns its `jsr.io` folder. */
async function vendorInto(scratch: string): Promise<string> {
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  const jsrImports = Object.fromEntries(
    Object.entries(config.imports as Record<string, string>)
      .filter(([, target]) => target.startsWith("jsr:")),
  );
  const specifiers = await stdSpecifiers();
  await Deno.writeTextFile(
    `${scratch}/deno.json`,
    JSON.stringify({ vendor: true, lock: false, imports: jsrImports }),
  );
  await Deno.writeTextFile(
    `${scratch}/deps.ts`,
    specifiers.map((specifier) => `import "${specifier}";\n`).join(""),
  );
  const install = await new Deno.Command(Deno.execPath(), {
    args: ["install", "--quiet", "--entrypoint", "deps.ts"],
    cwd: scratch,
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  if (!install.success) {
    throw new Error(
      "Could not fetch the @std modules: deno install failed (it needs jsr.io or a mirror in JSR_URL)",
    );
  }
  const hosts = [];
  for await (const entry of Deno.readDir(`${scratch}/vendor`)) {
    if (entry.isDirectory) hosts.push(entry.name);
  }
  if (hosts.length !== 1) {
    throw new Error(`Expected one registry folder in the scratch vendor tree, found: ${hosts}`);
  }
  return `${scratch}/vendor/${hosts[0]}`;
}

async function main() {
  const check = Deno.args.includes("--check");
  const committed = new URL("vendor/jsr.io", ROOT).pathname;
  const scratch = await Deno.makeTempDir({ prefix: "mamba-vendor-" });
  try {
    const fresh = await vendorInto(scratch);
    const want = await readTree(fresh);
    const have = await readTree(committed);
    const stale = [...new Set([...want.keys(), ...have.keys()])].filter((path) => {
      const a = want.get(path), b = have.get(path);
      return !a || !b || !sameBytes(a, b);
    }).sort();
    if (check) {
      if (stale.length > 0) {
        console.error(
          `vendor/jsr.io is stale (run deno task vendor): ${stale.slice(0, 10).join(", ")}` +
            (stale.length > 10 ? ` and ${stale.length - 10} more` : ""),
        );
        Deno.exit(1);
      }
      console.log(`vendor/jsr.io is up to date (${want.size} files)`);
      return;
    }
    await Deno.remove(committed, { recursive: true }).catch((error) => {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    });
    await Deno.mkdir(new URL("vendor", ROOT), { recursive: true });
    await Deno.rename(fresh, committed);
    console.log(`vendor/jsr.io: ${want.size} files, ${stale.length} changed`);
  } finally {
    await Deno.remove(scratch, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) await main();
