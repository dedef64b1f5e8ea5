// `blkif xen-backend`: blkif's blkback as the block backend of a driver domain on a real Xen
// (dom0 or another), serving the VBDs the toolstack (xl) hands it: see README "On a real Xen".
import { Command } from 'commander';
import { DEFAULT_BLKBACK_OPTIONS, type BlkbackOptions } from '../blkback/index.js';
import { VbdBus } from '../driver-domain/vbd-bus.js';
import { RealXen } from '../xen/real/real-xen.js';
import { XenstoreClient } from '../xenstore/index.js';
import { wholeNumber } from './errors.js';
import { untilStopSignal } from './stop-signal.js';

interface XenBackendOptions {
  xenstore: string;
  maxIndirectSegments: string;
  maxRingPageOrder: string;
  maxQueues: string;
  persistent: boolean;
  grantCopy?: boolean;
}

export function xenBackendCommand(): Command {
  return new Command('xen-backend')
    .description("serve the VBDs a real Xen's toolstack hands this domain (disk lines with script=blkif-vbd), until SIGINT/SIGTERM")
    .option('--xenstore <path>', "xenstored's socket", '/run/xenstored/socket')
    .option('--max-indirect-segments <n>', 'feature-max-indirect-segments offered (0: no indirect requests)', String(DEFAULT_BLKBACK_OPTIONS.maxIndirectSegments))
    .option('--max-ring-page-order <n>', 'max-ring-page-order offered', String(DEFAULT_BLKBACK_OPTIONS.maxRingPageOrder))
    .option('--max-queues <n>', 'multi-queue-max-queues offered', String(DEFAULT_BLKBACK_OPTIONS.maxQueues))
    .option('--no-persistent', 'do not offer feature-persistent')
    .option('--grant-copy', "reach the guest's pages by grant copy instead of mapping them")
    .action(async (o: XenBackendOptions) => {
      const blkback: Partial<BlkbackOptions> = {
        maxIndirectSegments: wholeNumber('--max-indirect-segments', o.maxIndirectSegments),
        maxRingPageOrder: wholeNumber('--max-ring-page-order', o.maxRingPageOrder),
        maxQueues: wholeNumber('--max-queues', o.maxQueues),
        persistent: o.persistent,
        grantCopy: o.grantCopy === true,
      };
      const log = (m: string) => process.stderr.write(`blkif: ${m}\n`);
      let xs: XenstoreClient | undefined;
      let xen: RealXen;
      let domid: number;
      try {
        xs = await XenstoreClient.connectSocket(o.xenstore);
        domid = Number(await xs.read('domid'));
        xen = RealXen.open({ domid });
      } catch (e) {
        // Not on a real Xen, or not allowed there: one line, no stack.
        log(`xen-backend: ${(e as Error).message} (xenstore ${o.xenstore})`);
        xs?.close();
        process.exitCode = 1;
        return;
      }
      const bus = await VbdBus.start({
        xen, xs, domid, blkback, log,
        onRemoved: (dir, counters) => {
          const held = xen.held();
          log(`${dir}: counters ${JSON.stringify(counters)}`);
          log(`held mapped=${held.mapped} bound=${held.bound}`);
        },
      });
      process.stdout.write(`ready domid=${domid} watching ${bus.root}\n`);
      await untilStopSignal();
      await bus.close();
      const held = xen.held();
      log(`exiting: held mapped=${held.mapped} bound=${held.bound}`);
      await xen.close();
      xs.close();
    });
}
