/**
 * {@link yieldToEventLoop}: lets timers, I/O and other requests run between
 * two pieces of synchronous work.
 *
 * @module
 */

const immediate = (globalThis as { setImmediate?: (callback: () => void) => unknown })
  .setImmediate;

/**
 * Resolves once the event loop has turned. The CPU backends resolve every
 * await at once (as microtasks), so a loop over them would otherwise hold
 * the thread to its end: no bytes would reach a client and no other request
 * would start. `setImmediate` (Deno and Node have it) is a macrotask without
 * the 4 ms that nested `setTimeout` calls are clamped to; other runtimes fall
 * back to `setTimeout`.
 */
export function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => immediate ? immediate(resolve) : setTimeout(resolve, 0));
}
