/**
 * Xenbus helpers a split driver uses on either end (Linux drivers/xen/xenbus: xenbus_switch_state,
 * xenbus_grant_ring, xenbus_alloc_evtchn, and waiting for the other end's state through a watch).
 */
import type { XenAccess } from '../xen/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { XS_STATE } from './paths.js';
import { parseXenbusState, xenbusMayMove, xenbusStateName, type XenbusSide, type XenbusState } from './state.js';

export class XenbusError extends Error {
  override name = 'XenbusError';
}

let watchSeq = 0;

export async function readState(xs: XenstoreClient, dir: string): Promise<XenbusState | undefined> {
  try {
    return parseXenbusState(await xs.read(`${dir}/${XS_STATE}`));
  } catch {
    return undefined; // no node yet: the other end has not been created
  }
}

/** `xenbus_switch_state`: writes our `state`, refusing a move blkif.h does not allow this side. */
export async function switchState(xs: XenstoreClient, dir: string, side: XenbusSide, to: XenbusState): Promise<void> {
  const from = (await readState(xs, dir)) ?? 0;
  if (!xenbusMayMove(side, from, to)) {
    throw new XenbusError(`${side} at ${dir} may not move from ${xenbusStateName(from)} to ${xenbusStateName(to)}`);
  }
  await xs.write(`${dir}/${XS_STATE}`, String(to));
}

/**
 * Waits until the `state` node under `dir` satisfies `want`, through a watch (which fires once on
 * registration, so a state already reached resolves at once). Rejects after `timeoutMs`.
 */
export async function waitForState(
  xs: XenstoreClient,
  dir: string,
  want: (s: XenbusState | undefined) => boolean,
  timeoutMs = 10_000,
): Promise<XenbusState | undefined> {
  const path = `${dir}/${XS_STATE}`;
  const token = `xenbus-wait-${process.pid}-${++watchSeq}`;
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (err: Error | undefined, s?: XenbusState) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      xs.unwatch(path, token).catch(() => undefined);
      if (err) reject(err);
      else resolve(s);
    };
    const timer = setTimeout(() => {
      void readState(xs, dir).then((s) => finish(new XenbusError(`timed out after ${timeoutMs} ms waiting at ${path} (state ${s === undefined ? 'absent' : xenbusStateName(s)})`)));
    }, timeoutMs);
    xs.watch(path, token, () => {
      void readState(xs, dir).then((s) => {
        if (want(s)) finish(undefined, s);
      });
    }).catch((e: Error) => finish(e));
  });
}

/** `xenbus_grant_ring`: grants each ring page to the other end, in page order; returns the refs. */
export function grantRing(xen: XenAccess, otherend: number, frames: readonly number[]): number[] {
  const refs: number[] = [];
  for (const frame of frames) {
    // Both ends write a ring for as long as it is shared (ring.h).
    const ref = xen.grants.grantAccess(otherend, frame, false, { lasting: true });
    if (ref < 0) {
      for (const r of refs) xen.grants.endAccess(r);
      throw new XenbusError(`granting ring page ${frame} to domain ${otherend} failed (${ref})`);
    }
    refs.push(ref);
  }
  return refs;
}

/** `xenbus_alloc_evtchn`: an unbound port the other end will bind. */
export function allocEvtchn(xen: XenAccess, otherend: number): number {
  const port = xen.events.allocUnbound(otherend);
  if (port < 0) throw new XenbusError(`allocating an event channel for domain ${otherend} failed (${port})`);
  return port;
}

/**
 * Every node under `dir` down to `depth` levels, as relative key -> value (a directory's own
 * value too): the other end's nodes for a negotiation record to read (abi/negotiation.ts). A node
 * removed while listing is simply absent.
 */
export async function readNodes(xs: XenstoreClient, dir: string, depth = 2): Promise<Map<string, string>> {
  const nodes = new Map<string, string>();
  const walk = async (rel: string, level: number): Promise<void> => {
    const children = await xs.directory(rel === '' ? dir : `${dir}/${rel}`).catch(() => [] as string[]);
    await Promise.all(children.map(async (c) => {
      const key = rel === '' ? c : `${rel}/${c}`;
      const value = await xs.read(`${dir}/${key}`).catch(() => undefined);
      if (value !== undefined) nodes.set(key, value);
      if (level + 1 < depth) await walk(key, level + 1);
    }));
  };
  await walk('', 0);
  return nodes;
}

/** Writes a negotiation record's nodes under `dir` (an undefined value removes the node), in `tx`. */
export async function writeNodes(xs: XenstoreClient, dir: string, nodes: readonly (readonly [string, string | undefined])[], tx = 0): Promise<void> {
  for (const [key, value] of nodes) {
    if (value === undefined) await xs.rm(`${dir}/${key}`, tx).catch(() => undefined);
    else await xs.write(`${dir}/${key}`, value, tx);
  }
}
