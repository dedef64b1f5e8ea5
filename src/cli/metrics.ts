/**
 * `--metrics PORT`: the per-VBD counters (Linux blkback's sysfs `statistics/` and ours) and the
 * NBD server's in Prometheus text format at http://127.0.0.1:PORT/metrics, read fresh per scrape.
 */
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Registry } from 'prom-client';
import type { VbdCounters } from '../blkback/index.js';
import type { DiskExportStatus } from '../product/index.js';

const GAUGES: ReadonlySet<keyof VbdCounters> = new Set(['inflight_req', 'inflight_bytes', 'peak_inflight_bytes']);
const HELP: Partial<Record<keyof VbdCounters, string>> = {
  oo_req: 'times requests waited on the ring for a free pending slot (Linux oo_req)',
  rd_req: 'read requests (Linux rd_req)', wr_req: 'write requests (Linux wr_req)',
  f_req: 'flush and barrier requests (Linux f_req)', ds_req: 'discard requests (Linux ds_req)',
  rd_sect: '512-byte sectors read (Linux rd_sect)', wr_sect: '512-byte sectors written (Linux wr_sect)',
};

export async function startMetrics(port: number, status: () => Promise<DiskExportStatus>): Promise<Server> {
  const registry = new Registry();
  let latest: Promise<DiskExportStatus> | undefined;
  // One status round trip per scrape, shared by every metric's collect().
  const snapshot = () => (latest ??= status().finally(() => setImmediate(() => { latest = undefined; })));
  const keys = Object.keys((await status()).vbds[0]?.backend.counters ?? {}) as (keyof VbdCounters)[];
  for (const k of keys) {
    const name = `blkif_vbd_${k}${GAUGES.has(k) ? '' : '_total'}`;
    const help = HELP[k] ?? k.replace(/_/g, ' ');
    const collect = async function (this: Counter<'vbd'> | Gauge<'vbd'>) {
      const s = await snapshot();
      this.reset();
      for (const v of s.vbds) (this as Gauge<'vbd'>).inc({ vbd: v.name }, v.backend.counters[k]);
    };
    if (GAUGES.has(k)) new Gauge({ name, help, labelNames: ['vbd'], registers: [registry], collect });
    else new Counter({ name, help, labelNames: ['vbd'], registers: [registry], collect });
  }
  new Gauge({
    name: 'blkif_nbd_connections', help: 'NBD connections open now', registers: [registry],
    async collect() { this.set((await snapshot()).nbd?.connections.active ?? 0); },
  });
  new Counter({
    name: 'blkif_nbd_bytes_read_total', help: 'bytes NBD clients read', registers: [registry],
    async collect() { this.reset(); this.inc((await snapshot()).nbd?.bytesRead ?? 0); },
  });
  new Counter({
    name: 'blkif_nbd_bytes_written_total', help: 'bytes NBD clients wrote', registers: [registry],
    async collect() { this.reset(); this.inc((await snapshot()).nbd?.bytesWritten ?? 0); },
  });
  const server = createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end('see /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (e: Error) => res.writeHead(500).end(`${e.message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  return server;
}
