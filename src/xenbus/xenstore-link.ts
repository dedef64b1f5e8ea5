/**
 * A guest's connection to xenstore through its shared page and an event channel, as a PV guest
 * has it: the guest grants dom0 a page and offers an unbound port (what start_info's store_mfn and
 * store_evtchn give a real guest); the toolstack maps it, binds the port, and attaches the
 * daemon's page server. The messages travel over the domain thread's parentPort: the toolstack
 * asks first (a worker's parentPort queues messages until it listens, so none is lost), the guest
 * offers, the toolstack says ready.
 */
import { parentPort, type Worker } from 'node:worker_threads';
import type { Hypervisor, XenDomain } from '../xen/index.js';
import { XenstoreClient, XenstorePageClient, XenstorePageServer, type XenstoreDaemon } from '../xenstore/index.js';

interface StoreConnect {
  kind: 'xenstore-connect';
}
interface StoreOffer {
  kind: 'xenstore-offer';
  ref: number;
  port: number;
}
interface StoreReady {
  kind: 'xenstore-ready';
}

/** Guest side: connect to the toolstack's xenstore; resolves once the daemon is attached. */
export async function connectGuestXenstore(xen: XenDomain, toolstackDomid = 0): Promise<{ xs: XenstoreClient; close(): void }> {
  if (parentPort === null) throw new Error('connectGuestXenstore runs inside a domain thread');
  const port0 = parentPort;
  const next = <T extends { kind: string }>(kind: T['kind']): Promise<T> =>
    new Promise((resolve) => {
      const onMsg = (m: unknown) => {
        if ((m as T | undefined)?.kind === kind) {
          port0.off('message', onMsg);
          resolve(m as T);
        }
      };
      port0.on('message', onMsg);
    });
  await next<StoreConnect>('xenstore-connect');
  const [frame] = xen.memory.alloc(1);
  const ref = xen.grants.grantAccess(toolstackDomid, frame!, false, { lasting: true });
  const port = xen.events.allocUnbound(toolstackDomid);
  if (ref < 0 || port < 0) throw new Error(`xenstore page setup failed (ref ${ref}, port ${port})`);
  const ready = next<StoreReady>('xenstore-ready');
  port0.postMessage({ kind: 'xenstore-offer', ref, port } satisfies StoreOffer);
  await ready;
  const transport = new XenstorePageClient(xen.memory.page(frame!), () => xen.events.notify(port));
  const off = xen.events.on(port, () => transport.onEvent());
  const xs = new XenstoreClient(transport);
  return {
    xs,
    close() {
      xs.close();
      off();
      xen.events.close(port);
      xen.grants.endAccess(ref);
    },
  };
}

/**
 * Toolstack side: answer a guest thread's offer by mapping its page, binding its port and
 * attaching the daemon. When the domain is destroyed (or its thread dies) the mapping and port
 * are released and the daemon releases the domain: its watches, transactions and the nodes it
 * owned go, and @releaseDomain fires. Returns the teardown (idempotent) for an earlier end.
 */
export function acceptGuestXenstore(hv: Hypervisor, daemon: XenstoreDaemon, guestDomid: number, worker: Worker): Promise<() => void> {
  const dom0 = hv.dom0;
  return new Promise((resolve, reject) => {
    const onMsg = (m: unknown) => {
      const offer = m as StoreOffer | undefined;
      if (offer?.kind !== 'xenstore-offer') return;
      worker.off('message', onMsg);
      worker.off('exit', onExit);
      const map = dom0.grants.mapGrant(guestDomid, offer.ref, false);
      if (map.page === undefined) return reject(new Error(`mapping domain ${guestDomid}'s xenstore page failed (status ${map.status})`));
      const local = dom0.events.bindInterdomain(guestDomid, offer.port);
      if (local < 0) {
        dom0.grants.unmapGrant(map.handle);
        return reject(new Error(`binding domain ${guestDomid}'s xenstore port failed (${local})`));
      }
      const server = new XenstorePageServer(daemon, guestDomid, map.page, () => dom0.events.notify(local));
      const off = dom0.events.on(local, () => server.onEvent());
      let open = true;
      const teardown = () => {
        if (!open) return;
        open = false;
        unsubscribe();
        off();
        server.close();
        dom0.events.close(local);
        dom0.grants.unmapGrant(map.handle);
      };
      const unsubscribe = hv.onDomainDestroyed((domid) => {
        if (domid !== guestDomid) return;
        teardown();
        daemon.releaseDomain(domid);
      });
      worker.postMessage({ kind: 'xenstore-ready' } satisfies StoreReady);
      resolve(teardown);
    };
    // A domain that ends before offering its page would leave the toolstack waiting forever.
    const onExit = (code: number) => {
      worker.off('message', onMsg);
      reject(new Error(`domain ${guestDomid} exited (code ${code}) before offering its xenstore page`));
    };
    worker.on('message', onMsg);
    worker.once('exit', onExit);
    worker.postMessage({ kind: 'xenstore-connect' } satisfies StoreConnect);
  });
}
