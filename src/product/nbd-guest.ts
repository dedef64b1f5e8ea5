/**
 * The NBD server inside the exporting guest: a guest application (toolstack/guest-application.ts)
 * that serves the guest's disks straight from their blkfronts, so every byte a client moves goes
 * through the PV protocol. DiskExport loads it into its guest and drives it over the control channel.
 */
import { NbdServer, nbdUri, type NbdAddress, type NbdListenOptions, type NbdServerLimits, type NbdServerTlsConfig } from '../nbd/index.js';
import type { GuestApplicationModule, GuestContext } from '../toolstack/index.js';
import { exportDevice } from './nbd-device.js';

/** An export the NBD server in the guest offers: a disk attached there, at `frontDir`. */
export interface GuestExportSpec {
  name: string;
  description: string;
  frontDir: string;
  /** Only the NBD server writes this disk (a local image): it may report what it zeroed (base:allocation). */
  ownsWrites: boolean;
}

/** This module, for `Toolstack.createGuest`'s applications. */
export const NBD_GUEST_APPLICATION = new URL(import.meta.url);

export function guestHandlers(guest: GuestContext) {
  let nbd: NbdServer | undefined;
  const stopNbd = async () => {
    const s = nbd;
    nbd = undefined;
    await s?.close();
  };
  return {
    /**
     * Starts an NBD server in this guest exporting `exports` on every address of `listen` (a TCP
     * port 0 after the first is the port the first got); returns the addresses and the first's URI.
     */
    async serveNbd(
      exports: GuestExportSpec[], listen: NbdListenOptions | NbdListenOptions[], tls?: NbdServerTlsConfig, limits: NbdServerLimits = {},
    ): Promise<{ uri: string; address: NbdAddress; addresses: NbdAddress[] }> {
      if (nbd !== undefined) throw new Error('an NBD server already runs in this guest');
      const server = new NbdServer({
        defaultExport: exports[0]?.name,
        log: (level, msg) => { if (level !== 'debug') guest.log(`nbd ${level}: ${msg}`); },
        ...(tls !== undefined ? { tls } : {}),
        ...limits,
      });
      for (const e of exports) server.addExport({ name: e.name, description: e.description, device: exportDevice(guest.disk(e.frontDir)), ownsWrites: e.ownsWrites });
      const addresses: NbdAddress[] = [];
      try {
        for (const l of Array.isArray(listen) ? listen : [listen]) {
          const first = addresses[0];
          const where = 'port' in l && l.port === 0 && first !== undefined && 'port' in first ? { ...l, port: first.port } : l;
          addresses.push(await server.listen(where));
        }
      } catch (e) {
        await server.close();
        throw e;
      }
      nbd = server;
      return { uri: nbdUri(addresses[0]!), address: addresses[0]!, addresses };
    },
    /** Stops accepting, lets in-flight requests finish, closes the connections. */
    stopNbd,
    nbdStats: () => nbd?.stats(),
    close: stopNbd,
  } satisfies ReturnType<GuestApplicationModule['guestHandlers']>;
}
