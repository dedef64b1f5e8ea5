// `blkif xen-frontend`: blkif's blkfront on a real Xen, attached from this domain's userspace to
// a VBD a real backend serves (Linux's xen-blkback or ours), and that disk exported over NBD:
// see README "blkif's blkfront on a real Xen" and docs/real-xen.md.
import { Command } from 'commander';
import { Blkfront } from '../blkfront/index.js';
import { NbdServer, nbdUri } from '../nbd/index.js';
import { exportDevice } from '../product/index.js';
import { RealXen } from '../xen/real/real-xen.js';
import { XenstoreClient } from '../xenstore/index.js';
import { wholeNumber } from './errors.js';
import { untilStopSignal } from './stop-signal.js';

interface XenFrontendOptions {
  xenstore: string;
  bind: string;
  port: string;
  exportName: string;
  maxIndirectSegments: string;
  queues: string;
  ringPageOrder: string;
  bufferPages: string;
  persistent: boolean;
}

export function xenFrontendCommand(): Command {
  return new Command('xen-frontend')
    .description("attach to a VBD of this domain that a real Xen's backend serves (made by `xl block-attach`), and export it over NBD until SIGINT/SIGTERM")
    .argument('<vbd>', 'the frontend directory (/local/domain/0/device/vbd/51728) or its device id (51728)')
    .option('--xenstore <path>', "xenstored's socket", '/run/xenstored/socket')
    .option('-b, --bind <addr>', 'address to listen on', '127.0.0.1')
    .option('-p, --port <port>', 'TCP port', '10809')
    .option('-x, --export-name <name>', 'the export name', '')
    .option('--max-indirect-segments <n>', 'our cap on segments per indirect request (0: none)', '256')
    .option('--queues <n>', 'rings wanted', '1')
    .option('--ring-page-order <n>', 'ring size wanted, as log2(pages)', '0')
    .option('--buffer-pages <n>', 'pages lent to the backend (shared through gntalloc: its limit must cover them)', '1024')
    .option('--no-persistent', 'do not offer feature-persistent')
    .action(async (vbd: string, o: XenFrontendOptions) => {
      const options = {
        maxIndirectSegments: wholeNumber('--max-indirect-segments', o.maxIndirectSegments),
        queues: wholeNumber('--queues', o.queues),
        ringPageOrder: wholeNumber('--ring-page-order', o.ringPageOrder),
        bufferPages: wholeNumber('--buffer-pages', o.bufferPages),
        persistent: o.persistent,
      };
      const port = wholeNumber('--port', o.port);
      const devid = vbd.startsWith('/') ? undefined : wholeNumber('<vbd>', vbd);
      const log = (m: string) => process.stderr.write(`blkif: ${m}\n`);
      let xs: XenstoreClient | undefined;
      let xen: RealXen | undefined;
      let f: Blkfront;
      try {
        xs = await XenstoreClient.connectSocket(o.xenstore);
        const domid = Number(await xs.read('domid'));
        const frontDir = devid === undefined ? vbd : `/local/domain/${domid}/device/vbd/${devid}`;
        const backDomid = Number(await xs.read(`${frontDir}/backend-id`).catch(() => { throw new Error(`${frontDir}: no such VBD (no backend-id)`); }));
        // Ring pages come from the same gntalloc pool as the data pages.
        xen = RealXen.open({ domid, shareWith: backDomid, memoryPages: options.bufferPages + 16 * options.queues * (1 << options.ringPageOrder) });
        f = await Blkfront.attach({ xen, xs, frontDir, options, log });
      } catch (e) {
        log(`xen-frontend: ${(e as Error).message}`);
        await xen?.close();
        xs?.close();
        process.exitCode = 1;
        return;
      }
      const server = new NbdServer({ exports: [{ name: o.exportName, description: `blkif blkfront on ${vbd}`, device: exportDevice(f) }] });
      const address = await server.listen({ host: o.bind, port });
      const i = f.info;
      log(`attached: ${i.size} bytes, ${i.indirect ? `indirect ${i.maxSegments}` : 'no indirect'}, ${i.queues} queue(s), ring order ${i.ringPageOrder}, ${i.persistent ? 'persistent grants' : 'grant per request'}`);
      process.stdout.write(`ready ${nbdUri(address, o.exportName)}\n`);
      await untilStopSignal();
      await server.close();
      await f.close().catch((e: unknown) => log(`close: ${(e as Error).message}`));
      const held = xen.held();
      log(`exiting: held mapped=${held.mapped} bound=${held.bound}`);
      await xen.close();
      xs.close();
    });
}
