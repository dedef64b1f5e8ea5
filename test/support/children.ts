/**
 * Child processes a test file starts (blkif serve, qemu-nbd, nbdkit, ...) are tracked and ended
 * when the file's tests are done, even when a test failed before its own cleanup: a child left
 * running would keep the test file alive and hang the run.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { after } from 'node:test';

const children = new Set<ChildProcess>();

function endAll(): void {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  children.clear();
}

// Top level of this module: a root-level hook in every test file that imports it.
after(endAll);
// And if the file ends another way (the file timeout in test/setup/file-timeout.ts, an uncaught error).
process.once('exit', endAll);

/** Tracks `child` until it exits; it is SIGKILLed when the test file ends. */
export function track<C extends ChildProcess>(child: C): C {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** `spawn`, tracked. */
export function spawnTracked(cmd: string, args: readonly string[], opts: SpawnOptions = {}): ChildProcess {
  return track(spawn(cmd, args, opts));
}
