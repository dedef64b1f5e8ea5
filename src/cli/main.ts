#!/usr/bin/env node
/** The `blkif` command line: one file per command, registered here. */
import { Command, CommanderError } from 'commander';
import { VERSION } from '../index.js';
import { UsageError } from './errors.js';
import { ringCommand } from './ring.js';
import { serveCommand } from './serve.js';
import { xenBackendCommand } from './xen-backend.js';
import { xenFrontendCommand } from './xen-frontend.js';
import { xenstoredCommand } from './xenstored.js';

const program = new Command('blkif')
  .description('the Xen PV block protocol (blkif) on an emulated Xen')
  .version(VERSION)
  .showHelpAfterError('(run with --help for usage)')
  .addCommand(serveCommand())
  .addCommand(ringCommand())
  .addCommand(xenstoredCommand())
  .addCommand(xenBackendCommand())
  .addCommand(xenFrontendCommand());

// Every command's usage errors exit 2 (commander's own included), with one line on stderr.
program.exitOverride();
for (const c of program.commands) c.exitOverride();
for (const c of program.commands.flatMap((c) => c.commands)) c.exitOverride();

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) {
    if (e.exitCode === 0) process.exit(0); // --help, --version
    process.exit(2);
  }
  if (e instanceof UsageError) {
    process.stderr.write(`blkif: ${e.message}\n`);
    process.exit(2);
  }
  throw e;
}
