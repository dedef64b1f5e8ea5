#!/usr/bin/env node
/**
 * The `blkif` executable. For `serve` it sizes libuv's threadpool before anything else runs, then
 * loads the command line (main.ts). CommonJS on purpose: Node reads an ES module entry point
 * through the pool, which starts it at libuv's size of the moment (4), before the module's first
 * line could ask for more; a CommonJS file is loaded synchronously (see threadpool.cts).
 * A UV_THREADPOOL_SIZE already set is the user's choice, and kept.
 */
import { serveThreadpool } from './threadpool.cjs';

const args = process.argv.slice(2);
const command = args.findIndex((a) => !a.startsWith('-'));
if (process.env.UV_THREADPOOL_SIZE === undefined && args[command] === 'serve') {
  process.env.UV_THREADPOOL_SIZE = String(serveThreadpool(args.slice(command + 1)));
}
void import('./main.js');
