// `blkif xenstored --socket PATH`: the xenstore daemon on its own, serving
// dom0 clients (e.g. Xen's xenstore-* tools with XENSTORED_PATH=PATH).
import { Command } from 'commander';
import { XenstoreDaemon, XenstoreSocketServer } from '../xenstore/index.js';
import { untilStopSignal } from './stop-signal.js';

export function xenstoredCommand(): Command {
  return new Command('xenstored')
    .description('run the emulated xenstore daemon on a Unix socket until SIGINT/SIGTERM')
    .requiredOption('--socket <path>', 'Unix socket to listen on')
    .option('--keep-orphans', "give a released domain's nodes to dom0 instead of deleting them")
    .action(async (opts: { socket: string; keepOrphans?: boolean }) => {
      const daemon = new XenstoreDaemon({
        keepOrphans: opts.keepOrphans === true,
        log: (line) => process.stderr.write(line + '\n'),
      });
      const server = await XenstoreSocketServer.listen(daemon, opts.socket);
      process.stdout.write(`ready ${server.path}\n`);
      await untilStopSignal();
      await daemon.close();
    });
}
