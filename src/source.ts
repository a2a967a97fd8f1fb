/**
 * Where model files come from: a local directory, a `file://` or `http(s)://`
 * URL of a model directory, or a Hugging Face repo id (`owner/name`), which
 * resolves to `<endpoint>/<id>/resolve/<revision>/<file>` and is cached on disk
 * so that a second load works offline.
 *
 * The hub endpoint is `https://huggingface.co` unless `HF_ENDPOINT` or the
 * `hfEndpoint` option says otherwise. The cache directory is the `cacheDir`
 * option, else `$MAMBA_CACHE_DIR`, else `$XDG_CACHE_HOME/mamba-deno`, else
 * `~/.cache/mamba-deno`; files of repo `owner/name` go to
 * `<cache>/hub/owner--name/<revision>/`. Where the runtime has no file system
 * (edge), files are simply not cached.
 *
 * Importing this module needs no permission, and a URL source only needs
 * `--allow-net`. The hub cache and the environment variables are optional:
 * they are used only where the permission is already granted (read and write
 * of the cache directory; env for the variables), so a script run with just
 * `--allow-net` loads a repo id without a cache instead of failing or
 * showing a permission prompt.
 *
 * @module
 */

import { ModelFileError } from "./errors.ts";
import { mayUse } from "./permissions.ts";

/** Progress of one file's download or read. */
export interface LoadProgress {
  /** The file's name within the model directory. */
  file: string;
  /** Bytes received so far. */
  loaded: number;
  /** Total bytes, when known. */
  total?: number;
}

/** Options for opening a source. */
export interface SourceOptions {
  /** Called as bytes arrive. */
  onProgress?: (progress: LoadProgress) => void;
  /** Cache directory for hub downloads (see the module doc for the default). */
  cacheDir?: string;
  /** Hub endpoint; defaults to `$HF_ENDPOINT` or https://huggingface.co. */
  hfEndpoint?: string;
  /** Hub revision (branch, tag or commit); defaults to "main". */
  revision?: string;
  /** Passed to every fetch, to cancel a download. */
  signal?: AbortSignal;
  /**
   * Milliseconds a request may wait for the server's answer, and a download
   * for its next bytes, before it is given up (default 30,000).
   */
  timeoutMs?: number;
  /** Further attempts after a request fails at the network or with HTTP 5xx (default 3). */
  retries?: number;
}

/** A model directory, wherever it lives. */
export interface ModelSource {
  /** Where a file of this source is, for messages: a path or URL. */
  describe(name: string): string;
  /** Whether the file exists. */
  exists(name: string): Promise<boolean>;
  /**
   * The file's bytes; a missing file is a {@link ModelFileError}. With
   * `allocate`, the bytes land in the array it returns for the file's size
   * when the size is known before reading (see {@link Backend.hostBytes});
   * `onFilled`, where given, hears of each piece as it lands.
   */
  readBytes(name: string, allocate?: ByteAllocator, onFilled?: FillObserver): Promise<Uint8Array>;
  /**
   * The file's first bytes (up to 1 MiB, enough for a safetensors header) and
   * its total size, or null where they cannot be had cheaply: for checking
   * weight headers before anything is measured or allocated.
   */
  readHead?(name: string): Promise<FileHead | null>;
  /**
   * A local file holding the file's bytes (the file itself, or the cache's
   * copy, downloaded to it first), or null where there is none (no cache): a
   * GGUF file is then read in parts ({@link readFileRange}), tensor by tensor
   * as the backend takes them, rather than whole.
   */
  localPath?(name: string): Promise<string | null>;
}

/** A file's first bytes and its total size, from {@link ModelSource.readHead}. */
export interface FileHead {
  /** The first bytes (all of them for a short file). */
  head: Uint8Array;
  /** The file's size in bytes. */
  size: number;
}

/**
 * Returns `byteLength` bytes to read a file into, or undefined for a plain
 * array; `head` holds the file's first bytes, to decide by its content.
 */
export type ByteAllocator = (byteLength: number, head: Uint8Array) => Uint8Array | undefined;

/**
 * Told after each piece of a file lands in the array it is read into: the
 * array's first `filled` bytes now hold their final values.
 */
export type FillObserver = (bytes: Uint8Array, filled: number) => void;

/** Bytes read before asking an allocator, enough for a safetensors header. */
const HEAD_BYTES = 1 << 20;

/** Reads and parses a JSON file of a source, with errors that name it. */
export async function readJson(source: ModelSource, name: string): Promise<unknown> {
  const bytes = await source.readBytes(name);
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new ModelFileError(
      source.describe(name),
      `Not valid JSON: ${(error as Error).message}`,
      { cause: error },
    );
  }
}

function env(name: string): string | undefined {
  if (!mayUse({ name: "env", variable: name })) return undefined;
  try {
    return Deno.env.get(name) || undefined;
  } catch {
    return undefined; // No environment at all (edge).
  }
}

const REPO_ID = /^[A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*$/;

async function isDirectory(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isDirectory;
  } catch {
    return false;
  }
}

/**
 * Opens `source`: a URL (file:, http:, https:), a local directory, or an HF
 * repo id. A string that names an existing directory is always a directory.
 */
export async function openSource(
  source: string | URL,
  options: SourceOptions = {},
): Promise<ModelSource> {
  if (source instanceof URL || /^(https?|file):/i.test(source)) {
    const url = new URL(source);
    const dir = new URL(url.href.endsWith("/") ? url.href : `${url.href}/`);
    if (dir.protocol === "file:") {
      return new DirectorySource(decodeURIComponent(dir.pathname), options.onProgress);
    }
    return new HttpSource(dir, options, null);
  }
  if (await isDirectory(source)) {
    return new DirectorySource(source.endsWith("/") ? source : `${source}/`, options.onProgress);
  }
  // A typo in a relative path such as "models/tiny-shakespear" also reads as a
  // repo id; a first segment that exists here shows it was meant as a path.
  if (!REPO_ID.test(source) || await isDirectory(source.split("/")[0])) {
    throw new ModelFileError(
      source,
      "No such local directory (a Hugging Face repo id has the form owner/name)",
    );
  }
  const endpoint = (options.hfEndpoint ?? env("HF_ENDPOINT") ?? "https://huggingface.co")
    .replace(/\/+$/, "");
  const revision = options.revision ?? "main";
  const base = new URL(`${endpoint}/${source}/resolve/${encodeURIComponent(revision)}/`);
  const cacheRoot = options.cacheDir ?? defaultCacheDir();
  // Without read and write access the cache is skipped rather than prompted for.
  const cache = cacheRoot === undefined ||
      !mayUse({ name: "read", path: cacheRoot }) || !mayUse({ name: "write", path: cacheRoot })
    ? null
    : `${cacheRoot}/hub/${source.replace("/", "--")}/${revision.replaceAll("/", "--")}/`;
  return new HttpSource(base, options, cache);
}

/** The cache directory used for hub downloads when no option names one. */
export function defaultCacheDir(): string | undefined {
  const explicit = env("MAMBA_CACHE_DIR");
  if (explicit) return explicit;
  const xdg = env("XDG_CACHE_HOME");
  if (xdg) return `${xdg}/mamba-deno`;
  const home = env("HOME") ?? env("USERPROFILE");
  return home ? `${home}/.cache/mamba-deno` : undefined;
}

/** Local files are read in pieces of this many bytes, to report progress. */
const READ_CHUNK = 16 << 20;

class DirectorySource implements ModelSource {
  constructor(
    readonly dir: string,
    readonly onProgress?: (progress: LoadProgress) => void,
  ) {}

  describe(name: string): string {
    return `${this.dir}${name}`;
  }

  async exists(name: string): Promise<boolean> {
    try {
      return (await Deno.stat(this.describe(name))).isFile;
    } catch {
      return false;
    }
  }

  readHead(name: string): Promise<FileHead | null> {
    return readFileHead(this.describe(name));
  }

  localPath(name: string): Promise<string> {
    return Promise.resolve(this.describe(name));
  }

  async readBytes(
    name: string,
    allocate?: ByteAllocator,
    onFilled?: FillObserver,
  ): Promise<Uint8Array> {
    try {
      return await readFileInto(
        this.describe(name),
        allocate,
        (loaded, total) => this.onProgress?.({ file: name, loaded, total }),
        onFilled,
      );
    } catch (error) {
      const problem = error instanceof Deno.errors.NotFound
        ? "File not found"
        : `Cannot read the file: ${(error as Error).message}`;
      throw new ModelFileError(this.describe(name), problem, { cause: error });
    }
  }
}

/**
 * `length` bytes of local file `path` from byte `offset` on.
 *
 * @throws {ModelFileError} Naming `path`, when the file cannot be read or
 * ends before (it changed since its header was read).
 */
export function readFileRange(path: string, offset: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let filled = 0;
  try {
    using file = Deno.openSync(path);
    file.seekSync(offset, Deno.SeekMode.Start);
    while (filled < length) {
      const read = file.readSync(bytes.subarray(filled));
      if (read === null) break;
      filled += read;
    }
  } catch (error) {
    throw new ModelFileError(path, `Cannot read the file: ${(error as Error).message}`, {
      cause: error,
    });
  }
  if (filled < length) {
    const [at, end] = [offset + filled, offset + length];
    throw new ModelFileError(
      path,
      `Ends at byte ${at}, inside bytes ${offset} to ${end} (changed while loading?)`,
    );
  }
  return bytes;
}

/** A local file's first {@link HEAD_BYTES} bytes and its size, or null where it cannot be read. */
export async function readFileHead(path: string): Promise<FileHead | null> {
  try {
    using file = await Deno.open(path);
    const size = (await file.stat()).size;
    const head = new Uint8Array(Math.min(size, HEAD_BYTES));
    let loaded = 0;
    while (loaded < head.length) {
      const read = await file.read(head.subarray(loaded));
      if (read === null) return null;
      loaded += read;
    }
    return { head, size };
  } catch {
    return null;
  }
}

/**
 * Reads a whole local file into `allocate`'s array (or a new one), reporting
 * progress and each piece that lands.
 */
async function readFileInto(
  path: string,
  allocate: ByteAllocator | undefined,
  onProgress: (loaded: number, total: number) => void,
  onFilled?: FillObserver,
): Promise<Uint8Array> {
  using file = await Deno.open(path);
  const total = (await file.stat()).size;
  let loaded = 0;
  onProgress(loaded, total);
  let bytes: Uint8Array;
  if (allocate) {
    const head = new Uint8Array(Math.min(total, HEAD_BYTES));
    while (loaded < head.length) {
      const read = await file.read(head.subarray(loaded));
      if (read === null) throw new Error(`File shrank to ${loaded} bytes while being read`);
      loaded += read;
    }
    bytes = allocate(total, head) ?? new Uint8Array(total);
    bytes.set(head);
  } else {
    bytes = new Uint8Array(total);
  }
  onFilled?.(bytes, loaded);
  // The next piece is asked for before the observer hears of the last one,
  // so that its work (the finiteness scan) runs while the file is copied.
  const readNext = () =>
    loaded < total ? file.read(bytes.subarray(loaded, Math.min(total, loaded + READ_CHUNK))) : null;
  let reading = readNext();
  while (reading) {
    const read = await reading;
    if (read === null) throw new Error(`File shrank to ${loaded} bytes while being read`);
    loaded += read;
    reading = readNext();
    onFilled?.(bytes, loaded);
    onProgress(loaded, total);
  }
  return bytes;
}

class HttpSource implements ModelSource {
  constructor(
    readonly base: URL,
    readonly options: SourceOptions,
    /** Cache directory with a trailing slash, or null to fetch every time. */
    readonly cache: string | null,
  ) {}

  describe(name: string): string {
    return new URL(name, this.base).href;
  }

  async exists(name: string): Promise<boolean> {
    if (this.cache !== null) {
      if (await this.#isCached(name)) return true;
      if (await this.#isCached(missingMarker(name))) return false;
    }
    const { response, watchdog } = await this.#fetch(name, "HEAD");
    watchdog.stop();
    await response.body?.cancel();
    if (response.status === 404) {
      await this.#store(missingMarker(name), new Uint8Array());
      return false;
    }
    return response.ok;
  }

  async readBytes(
    name: string,
    allocate?: ByteAllocator,
    onFilled?: FillObserver,
  ): Promise<Uint8Array> {
    const cached = this.cache === null ? null : await this.#cached(name, allocate, onFilled);
    if (cached !== null) return cached;
    const bytes = await this.#download(
      name,
      (response, watchdog) => this.#receive(name, response, allocate, onFilled, watchdog),
    );
    await this.#store(name, bytes);
    return bytes;
  }

  /**
   * Fetches file `name` and hands the answer to `receive`; a missing file, an
   * HTTP error or a download that stalls is a {@link ModelFileError}.
   */
  async #download<T>(
    name: string,
    receive: (response: Response, watchdog: Watchdog) => Promise<T>,
  ): Promise<T> {
    const { response, watchdog } = await this.#fetch(name, "GET");
    if (!response.ok) {
      watchdog.stop();
      await response.body?.cancel();
      throw new ModelFileError(
        this.describe(name),
        response.status === 404
          ? "File not found (HTTP 404)"
          : `HTTP ${response.status} ${response.statusText}`,
      );
    }
    try {
      return await receive(response, watchdog);
    } catch (error) {
      if (!watchdog.timedOut) throw error;
      throw new ModelFileError(
        this.describe(name),
        `Download stalled: no data for ${watchdog.ms / 1000} s. ${offlineAdvice(this.cache)}`,
        { cause: error },
      );
    } finally {
      watchdog.stop();
    }
  }

  async readHead(name: string): Promise<FileHead | null> {
    if (this.cache !== null && await this.#isCached(name)) {
      return readFileHead(`${this.cache}${name}`);
    }
    // A range request: a server that ignores it sends the whole body, of which
    // the first chunks are read and the rest cancelled.
    const { response, watchdog } = await this.#fetch(name, "GET", {
      range: `bytes=0-${HEAD_BYTES - 1}`,
    });
    if (!response.ok || !response.body) {
      watchdog.stop();
      await response.body?.cancel();
      return null;
    }
    const range = /\/(\d+)$/.exec(response.headers.get("content-range") ?? "");
    const size = response.status === 206
      ? Number(range?.[1])
      : Number(response.headers.get("content-length"));
    const head = new Uint8Array(HEAD_BYTES);
    let loaded = 0;
    const reader = response.body.getReader();
    try {
      while (loaded < HEAD_BYTES) {
        const { done, value } = await reader.read();
        if (done) break;
        watchdog.feed();
        head.set(value.subarray(0, HEAD_BYTES - loaded), loaded);
        loaded += Math.min(value.length, HEAD_BYTES - loaded);
      }
      await reader.cancel();
    } finally {
      watchdog.stop();
    }
    return Number.isSafeInteger(size) && size >= loaded
      ? { head: head.slice(0, loaded), size }
      : null;
  }

  /**
   * Fetches `name`, retrying with back-off (0.5 s, 1 s, 2 s, …) where the
   * network fails or the server answers 5xx. The returned watchdog must be
   * fed while the body streams and stopped once it has.
   */
  async #fetch(
    name: string,
    method: string,
    headers?: HeadersInit,
  ): Promise<{ response: Response; watchdog: Watchdog }> {
    const retries = this.options.retries ?? 3;
    for (let attempt = 0;; attempt++) {
      const watchdog = new Watchdog(this.options.timeoutMs ?? 30_000, this.options.signal);
      let failure: unknown;
      try {
        const response = await fetch(this.describe(name), {
          method,
          headers,
          signal: watchdog.signal,
          redirect: "follow",
        });
        if (response.status < 500 || attempt >= retries) return { response, watchdog };
        await response.body?.cancel();
        failure = new Error(`HTTP ${response.status} ${response.statusText}`);
      } catch (error) {
        if (this.options.signal?.aborted) throw error;
        failure = watchdog.timedOut
          ? new Error(`No answer within ${watchdog.ms / 1000} s`, { cause: error })
          : error;
      }
      watchdog.stop();
      if (attempt >= retries) {
        throw new ModelFileError(
          this.describe(name),
          `Cannot fetch (${attempt + 1} attempts): ${causeOf(failure)}. ${
            offlineAdvice(this.cache)
          }`,
          { cause: failure },
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 500 * 2 ** attempt));
    }
  }

  /** Streams the body into one buffer, reporting progress as chunks arrive. */
  async #receive(
    name: string,
    response: Response,
    allocate: ByteAllocator | undefined,
    onFilled: FillObserver | undefined,
    watchdog: Watchdog,
  ): Promise<Uint8Array> {
    const header = Number(response.headers.get("content-length"));
    const total = Number.isFinite(header) && header > 0 ? header : undefined;
    const onProgress = this.options.onProgress;
    if (!response.body) return new Uint8Array(await response.arrayBuffer());
    // Allocated at the first chunk, which an allocator may look at.
    let buffer: Uint8Array | null = null;
    let loaded = 0;
    onProgress?.({ file: name, loaded, total });
    for await (const chunk of response.body) {
      watchdog.feed();
      let target: Uint8Array = buffer ??
        (total !== undefined ? allocate?.(total, chunk) : undefined) ??
        new Uint8Array(total ?? Math.max(chunk.length, 1 << 20));
      if (loaded + chunk.length > target.length) {
        const grown = new Uint8Array(Math.max(target.length * 2, loaded + chunk.length));
        grown.set(target.subarray(0, loaded));
        target = grown;
      }
      target.set(chunk, loaded);
      buffer = target;
      loaded += chunk.length;
      onFilled?.(buffer, loaded);
      onProgress?.({ file: name, loaded, total });
    }
    buffer ??= new Uint8Array(0);
    if (total !== undefined && loaded !== total) {
      throw new ModelFileError(
        this.describe(name),
        `Download ended after ${loaded} of ${total} bytes`,
      );
    }
    return loaded === buffer.length ? buffer : buffer.slice(0, loaded);
  }

  /**
   * The cache's copy of the file, downloaded there first where it is not yet:
   * streamed to disk as it arrives, never held whole. Null without a cache,
   * or where the cache cannot be written.
   */
  async localPath(name: string): Promise<string | null> {
    if (this.cache === null) return null;
    const path = `${this.cache}${name}`;
    if (await this.#isCached(name)) return path;
    const temp = `${path}.${crypto.randomUUID()}.partial`;
    let file: Deno.FsFile;
    try {
      await Deno.mkdir(this.cache, { recursive: true });
      file = await Deno.open(temp, { write: true, createNew: true });
    } catch {
      return null; // A read-only or absent file system: the caller reads the file whole.
    }
    try {
      await this.#download(
        name,
        (response, watchdog) => this.#save(name, response, watchdog, file),
      );
      file.close();
      await Deno.rename(temp, path);
      return path;
    } catch (error) {
      try {
        file.close();
      } catch {
        // Already closed.
      }
      await Deno.remove(temp).catch(() => {});
      throw error;
    }
  }

  /** Writes `response`'s body to `file` as it arrives, reporting progress. */
  async #save(name: string, response: Response, watchdog: Watchdog, file: Deno.FsFile) {
    const header = Number(response.headers.get("content-length"));
    const total = Number.isFinite(header) && header > 0 ? header : undefined;
    const onProgress = this.options.onProgress;
    let loaded = 0;
    onProgress?.({ file: name, loaded, total });
    for await (const chunk of response.body ?? []) {
      watchdog.feed();
      for (let written = 0; written < chunk.length;) {
        written += await file.write(chunk.subarray(written));
      }
      loaded += chunk.length;
      onProgress?.({ file: name, loaded, total });
    }
    if (total !== undefined && loaded !== total) {
      throw new ModelFileError(
        this.describe(name),
        `Download ended after ${loaded} of ${total} bytes`,
      );
    }
  }

  async #isCached(name: string): Promise<boolean> {
    try {
      return (await Deno.stat(`${this.cache}${name}`)).isFile;
    } catch {
      return false;
    }
  }

  async #cached(
    name: string,
    allocate?: ByteAllocator,
    onFilled?: FillObserver,
  ): Promise<Uint8Array | null> {
    try {
      return await readFileInto(
        `${this.cache}${name}`,
        allocate,
        (loaded, total) => this.options.onProgress?.({ file: name, loaded, total }),
        onFilled,
      );
    } catch {
      return null;
    }
  }

  /** Writes atomically (temp file + rename); a runtime without a file system skips it. */
  async #store(name: string, bytes: Uint8Array): Promise<void> {
    if (this.cache === null) return;
    try {
      await Deno.mkdir(this.cache, { recursive: true });
      const temp = `${this.cache}${name}.${crypto.randomUUID()}.partial`;
      await Deno.writeFile(temp, bytes);
      await Deno.rename(temp, `${this.cache}${name}`);
    } catch {
      // Read-only or absent file system: the download is still used, just not kept.
    }
  }
}

function missingMarker(name: string): string {
  return `${name}.missing`;
}

/**
 * Aborts a request when no answer or no bytes came for `ms` milliseconds, or
 * when the caller's signal aborts.
 */
class Watchdog {
  readonly ms: number;
  readonly signal: AbortSignal;
  timedOut = false;
  readonly #controller = new AbortController();
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(ms: number, outer: AbortSignal | undefined) {
    this.ms = ms;
    this.signal = outer
      ? AbortSignal.any([outer, this.#controller.signal])
      : this.#controller.signal;
    this.feed();
  }

  /** Restarts the countdown: bytes arrived. */
  feed(): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.timedOut = true;
      this.#controller.abort(new DOMException("The request timed out", "TimeoutError"));
    }, this.ms);
  }

  stop(): void {
    clearTimeout(this.#timer);
  }
}

/** The innermost useful words of a fetch failure (DNS failure, refused, time-out). */
function causeOf(error: unknown): string {
  const parts: string[] = [];
  for (let at = error; at instanceof Error && parts.length < 4; at = at.cause) {
    parts.push(at.message);
  }
  return parts.length > 0 ? parts.join(": ") : String(error);
}

/** How to do without the network; `cache` is this source's download cache, if any. */
function offlineAdvice(cache: string | null): string {
  return `To work offline, load a local model directory${
    cache ? `, or one already downloaded into the cache (${cache})` : ""
  }; HF_ENDPOINT points the hub requests at a mirror`;
}
