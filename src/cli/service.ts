/**
 * What makes `blkif serve` a service, as nbdkit and qemu-nbd behave: systemd socket activation,
 * a PID file, exiting with the parent, and knowing when an address reaches beyond this machine.
 */
import { isIP } from 'node:net';
import { rmSync, writeFileSync, renameSync } from 'node:fs';

/** systemd passes inherited sockets from this descriptor on (sd_listen_fds(3): SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

/**
 * The listening sockets systemd passed this process (`LISTEN_PID` naming it, `LISTEN_FDS`
 * counting them from fd 3), or undefined when there are none. The variables are removed, as
 * sd_listen_fds(1) does, so a child does not take the sockets for its own.
 */
export function inheritedSockets(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number[] | undefined {
  const owner = env.LISTEN_PID;
  const count = env.LISTEN_FDS;
  if (owner === undefined || count === undefined) return undefined;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!/^\d+$/.test(owner) || Number(owner) !== pid) return undefined;
  if (!/^\d+$/.test(count) || Number(count) < 1) return undefined;
  return Array.from({ length: Number(count) }, (_, i) => SD_LISTEN_FDS_START + i);
}

/** `[::1]` → `::1`; other addresses as given. */
export function bareHost(addr: string): string {
  return addr.replace(/^\[(.*)\]$/, '$1');
}

/** Whether a listening address is reachable only from this machine. */
export function isLoopback(host: string): boolean {
  const h = bareHost(host).toLowerCase();
  if (h === 'localhost' || h === '::1') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  // IPv4-mapped loopback.
  return /^::ffff:127\./.test(h);
}

/**
 * The warning for serving `host` (or an inherited socket) to the network without TLS required,
 * or undefined when there is nothing to warn about.
 */
export function exposureWarning(host: string, tls: 'off' | 'on' | 'require', readOnly: boolean): string | undefined {
  if (tls === 'require' || isLoopback(host)) return undefined;
  const what = readOnly ? 'read the disks' : 'read and overwrite the disks';
  const how = tls === 'on' ? 'TLS is offered but not required (--tls=on), so a client may skip it' : 'without TLS';
  return `warning: serving on ${host} ${how}: anyone who can reach this address can ${what}, in the clear; use --tls=require with --tls-psk or --tls-certificates`;
}

/** Writes `pid` to `path` whole (a reader never sees a half-written file), as nbdkit's --pidfile. */
export function writePidFile(path: string, pid = process.pid): void {
  const tmp = `${path}.${pid}.tmp`;
  writeFileSync(tmp, `${pid}\n`);
  renameSync(tmp, path);
}

export function removePidFile(path: string): void {
  rmSync(path, { force: true });
}

/**
 * Calls `onGone` once when this process's parent exits (its parent PID changes: the orphan is
 * adopted by init or a subreaper), checked every `intervalMs`. nbdkit asks Linux for a signal
 * (PR_SET_PDEATHSIG); Node has no prctl, and a cheap unref'd poll does the same job.
 */
export function watchParent(onGone: () => void, intervalMs = 500): () => void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(timer);
    onGone();
  }, intervalMs);
  timer.unref();
  return () => clearInterval(timer);
}
