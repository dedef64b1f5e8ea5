/** `blkif ring`: decode and encode ring page images, and the two-thread ring demo. */
import { readFileSync, writeFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { ABI_NAMES, BlkifJsonError, abiByName, blkifOpName, type BlkifAbi, type JsonObject } from '../abi/index.js';
import { MAX_RING_PAGE_ORDER } from '../ring/index.js';
import { UsageError } from './errors.js';
import { decodeRingImage, encodeRingImage, ringImageBytes, type RingImage } from './ring-image.js';
import { runRingExchange } from './ring-exchange.js';

const abiOption = () =>
  new Option('--abi <abi>', 'ABI of the ring entries, as the frontend\'s `protocol` key names it').choices([...ABI_NAMES]).default('native');

function abiFrom(name: string): BlkifAbi {
  const abi = abiByName(name);
  if (abi === undefined) throw new UsageError(`unknown ABI '${name}' (one of ${ABI_NAMES.join(', ')})`);
  return abi;
}

function orderFrom(v: string | undefined, fileBytes?: number): number {
  if (v === undefined) {
    // No --order: a file of exactly 2^k pages says its own order.
    for (let k = 0; k <= MAX_RING_PAGE_ORDER; k++) if (fileBytes === ringImageBytes(k)) return k;
    return 0;
  }
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > MAX_RING_PAGE_ORDER) throw new UsageError(`--order must be 0..${MAX_RING_PAGE_ORDER}, not '${v}'`);
  return n;
}

function readInput(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new UsageError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
  }
}

function formatTable(img: RingImage, abi: BlkifAbi): string {
  const lines = [
    `${abi.protocol} ring: ${img.ring_size} slots, req_prod=${img.req_prod} req_event=${img.req_event} rsp_prod=${img.rsp_prod} rsp_event=${img.rsp_event}`,
    ...(img.warnings ?? []).map((w) => `warning: ${w}`),
    `requests (${img.requests.length}):`,
  ];
  for (const r of img.requests) lines.push(`  ${String(r['index']).padStart(10)}  ${describeRequest(r)}`);
  lines.push(`responses (${img.responses.length}):`);
  for (const r of img.responses) lines.push(`  ${String(r['index']).padStart(10)}  id=${r['id']} ${blkifOpName(r['operation'] as number)} status=${r['status']}`);
  return lines.join('\n');
}

function describeRequest(r: JsonObject): string {
  const op = blkifOpName(r['operation'] as number);
  if (r['error'] !== undefined) return `${op} id=${r['id']} INVALID: ${r['message']}`;
  const parts = [op, `id=${r['id']}`];
  for (const k of ['indirect_op', 'nr_segments', 'handle', 'sector_number', 'flag', 'nr_sectors']) {
    if (r[k] !== undefined) parts.push(`${k}=${k === 'indirect_op' ? blkifOpName(r[k] as number) : r[k]}`);
  }
  if (Array.isArray(r['seg'])) {
    parts.push('seg=' + (r['seg'] as JsonObject[]).map((s) => `${s['gref']}:${s['first_sect']}-${s['last_sect']}`).join(','));
  }
  if (Array.isArray(r['indirect_grefs'])) parts.push(`indirect_grefs=${(r['indirect_grefs'] as number[]).join(',')}`);
  return parts.join(' ');
}

export function ringCommand(): Command {
  const ring = new Command('ring').description('inspect and build blkif shared-ring page images; run the ring demo');

  ring
    .command('decode')
    .description('print a ring page image (e.g. dumped from a guest) as a table or JSON')
    .argument('<page>', 'file holding the ring: 4096 << order bytes, pages in ring-ref order')
    .addOption(abiOption())
    .option('--order <n>', `ring page order 0..${MAX_RING_PAGE_ORDER} (default: from the file size, else 0)`)
    .option('--json', 'print JSON instead of a table')
    .action((page: string, o: { abi: string; order?: string; json?: boolean }) => {
      const abi = abiFrom(o.abi);
      const bytes = readInput(page);
      const order = orderFrom(o.order, bytes.byteLength);
      if (bytes.byteLength < ringImageBytes(order)) {
        throw new UsageError(`${page} holds ${bytes.byteLength} bytes; a ring of order ${order} needs ${ringImageBytes(order)}`);
      }
      const img = decodeRingImage(bytes, abi, order);
      process.stdout.write((o.json ? JSON.stringify(img, null, 2) : formatTable(img, abi)) + '\n');
    });

  ring
    .command('encode')
    .description('write a ring page image from a JSON spec (the shape `ring decode --json` prints)')
    .argument('<spec>', 'JSON file: {req_prod, req_event, rsp_prod, rsp_event, requests: [...], responses: [...]}')
    .requiredOption('-o, --output <page>', 'file to write the image to')
    .addOption(abiOption())
    .option('--order <n>', `ring page order 0..${MAX_RING_PAGE_ORDER}`, '0')
    .action((specPath: string, o: { output: string; abi: string; order: string }) => {
      const abi = abiFrom(o.abi);
      const order = orderFrom(o.order);
      let spec: unknown;
      try {
        spec = JSON.parse(readInput(specPath).toString('utf8'));
      } catch (e) {
        if (e instanceof UsageError) throw e;
        throw new UsageError(`${specPath} is not valid JSON: ${(e as Error).message}`);
      }
      let bytes: Uint8Array;
      try {
        bytes = encodeRingImage(spec, abi, order);
      } catch (e) {
        if (e instanceof BlkifJsonError) throw new UsageError(e.message);
        throw e;
      }
      writeFileSync(o.output, bytes);
    });

  ring
    .command('demo')
    .description('a frontend thread and a backend thread exchange requests through one shared ring')
    .option('--entries <n>', 'requests to exchange', '1000000')
    .addOption(abiOption())
    .option('--order <n>', `ring page order 0..${MAX_RING_PAGE_ORDER}`, '0')
    .action(async (o: { entries: string; abi: string; order: string }) => {
      const entries = Number(o.entries);
      if (!Number.isInteger(entries) || entries < 1) throw new UsageError(`--entries must be a positive integer, not '${o.entries}'`);
      const abi = abiFrom(o.abi);
      const order = orderFrom(o.order);
      process.stdout.write(`exchanging ${entries} requests over a ${abi.protocol} ring of order ${order} between two threads...\n`);
      const r = await runRingExchange({ entries, protocol: abi.protocol, order });
      const errors = [...r.front.errors, ...r.back.errors];
      const perSec = (entries / r.elapsedMs) * 1000;
      process.stdout.write(
        [
          `ring of ${r.ringSize} slots: ${entries} requests answered in ${r.elapsedMs.toFixed(0)} ms (${Math.round(perSec).toLocaleString('en-US')} round trips/s)`,
          `notifications: frontend sent ${r.front.notifiesSent} (${(r.front.notifiesSent / entries).toFixed(4)}/request), backend sent ${r.back.notifiesSent} (${(r.back.notifiesSent / entries).toFixed(4)}/response)`,
          `sleeps: frontend ${r.front.sleeps}, backend ${r.back.sleeps}`,
          errors.length === 0 ? 'every response matched its request: nothing lost, duplicated or reordered' : `ERRORS:\n  ${errors.join('\n  ')}`,
        ].join('\n') + '\n',
      );
      if (errors.length > 0) process.exitCode = 1;
    });
  return ring;
}
