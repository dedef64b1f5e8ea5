/**
 * `blkif serve [IMAGE...]`: the emulated Xen, a driver domain serving each image as a VBD, one
 * guest holding every VBD as a disk (xvda, xvdb, ...), and an NBD server in that guest exporting
 * its disks to qemu-img, qemu-io, nbdcopy, fio and friends. Every byte goes through blkfront,
 * grants, the ring and blkback. Ctrl-C or SIGTERM stops in order; a second Ctrl-C forces the exit.
 *
 * As a service (nbdkit's conventions): --tls with PSK or X.509, --bind (repeatable), systemd
 * socket activation, --pid-file, --exit-with-parent, --log to a file.
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { pino, type Logger } from 'pino';
import { xdgData } from 'xdg-basedir';
import { BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_MAX_SEGMENTS_PER_REQUEST, DEFAULT_MAX_INDIRECT_SEGMENTS, MAX_RING_PAGE_ORDER, indirectOfferError } from '../abi/index.js';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS, NBD_MAX_STRING, NbdTlsConfigError, loadServerTls, nbdUri, type NbdAddress, type NbdListenOptions, type NbdServerTlsConfig, type NbdTlsMode } from '../nbd/index.js';
import { DiskExport, ExportSetupError, exportStorage, prepareImages } from '../product/index.js';
import type { StorageSpec } from '../storage/index.js';
import { checkedByDefault } from '../xen/index.js';
import { UsageError } from './errors.js';
import { startMetrics } from './metrics.js';
import { parseSize } from './size.js';
import { RateMeter, formatRates } from './status.js';
import { bareHost, exposureWarning, inheritedSockets, removePidFile, watchParent, writePidFile } from './service.js';
import { SPARE_THREADS, effectiveThreadpool, imageHandles, serveThreadpoolShare } from './threadpool.cjs';

const DEFAULT_NBD_PORT = 10809;

interface ServeOptions {
  size?: string;
  force?: boolean;
  vbds?: number;
  maxIndirectSegments: number;
  sectorSize: number;
  ringPageOrder: number;
  queues: number;
  persistent: boolean;
  grantCopy?: boolean;
  queueThreads?: boolean;
  readonly?: boolean;
  port: number;
  socket?: string;
  bind?: string[];
  tls: NbdTlsMode;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
  pidFile?: string;
  exitWithParent?: boolean;
  log?: string;
  json?: boolean;
  metrics?: number;
  dataDir?: string;
  migrateEvery?: number;
  connections: number;
  exportName?: string[];
  description?: string[];
  shared: number;
  handshakeLimit: number;
}

const int = (what: string, min: number, max: number) => (v: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n < min || n > max) throw new InvalidArgumentError(`${what} must be an integer ${min}..${max}`);
  return n;
};

/** XDG data dir (`$XDG_DATA_HOME/blkif`, else `~/.local/share/blkif`), or ./blkif-data without a home. */
function defaultDataDir(): string {
  return xdgData !== undefined ? join(xdgData, 'blkif') : resolve('blkif-data');
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('export Xen PV disks over NBD: IMAGE files served by blkback in a driver domain, attached by blkfront in one guest')
    .argument('[image...]', `raw image files or remote NBD exports (nbd[s]://HOST[:PORT]/EXPORT, nbd[s]+unix:///EXPORT?socket=PATH), one VBD each (default: ${join(defaultDataDir(), 'vbd0.img')}, created at 1 GiB)`)
    .option('--size <size>', 'size of a new image (e.g. 1G, 512M); with --force, resize an existing one')
    .option('--force', 'allow --size to resize an existing image (shrinking loses its end)')
    .option('--vbds <n>', 'number of VBDs (disks xvda, xvdb, ... of the guest), exported as vbd0, vbd1, ...; default images vbdN.img', int('--vbds', 1, 64))
    .addOption(new Option('--max-indirect-segments <n>', `segments per indirect request the backend offers (0 = no indirect; max ${BLKIF_MAX_INDIRECT_SEGMENTS})`)
      .default(DEFAULT_MAX_INDIRECT_SEGMENTS).argParser((v) => {
        const n = int('--max-indirect-segments', 0, BLKIF_MAX_INDIRECT_SEGMENTS)(v);
        if (indirectOfferError(n) !== undefined) throw new InvalidArgumentError(`use 0 or more than ${BLKIF_MAX_SEGMENTS_PER_REQUEST}`);
        return n;
      }))
    .addOption(new Option('--sector-size <bytes>', 'logical sector size of the disks').choices(['512', '4096']).default(512).argParser(Number))
    .addOption(new Option('--ring-page-order <n>', `ring of 2^n pages (0..${MAX_RING_PAGE_ORDER})`).default(0).argParser(int('--ring-page-order', 0, MAX_RING_PAGE_ORDER)))
    .addOption(new Option('--queues <n>', 'rings per disk (multi-queue); the backend offers up to 4').default(1).argParser(int('--queues', 1, 4)))
    .option('--no-persistent', 'no persistent grants: grant and map every page per request')
    .option('--grant-copy', 'backend copies with GNTTABOP_copy instead of mapping grants (as QEMU does)')
    .option('--queue-threads', 'serve each queue in a driver-domain thread of its own (a vCPU, as Linux runs a kthread per ring); use with --queues')
    .option('-r, --readonly', 'serve the disks read-only (exports are read-only too)')
    .addOption(new Option('--connections <n>', 'connections to a remote NBD export (used when its server allows multi-conn)').default(1).argParser(int('--connections', 1, 8)))
    .option('-x, --export-name <name>', 'name of an image\'s export, once per image in the order of the images (default vbd0, vbd1, ...); the first image\'s is the default export',
      (v: string, prev: string[] | undefined) => [...(prev ?? []), exportText(v, '--export-name')])
    .option('-D, --description <text>', 'description of an image\'s export (nbdinfo shows it), once per image in the order of the images (default: which Xen disk it is)',
      (v: string, prev: string[] | undefined) => [...(prev ?? []), exportText(v, '--description')])
    .addOption(new Option('-e, --shared <n>', 'clients served at once (0 = no limit); past it a new client is refused, told why').default(DEFAULT_MAX_CONNECTIONS).argParser(int('--shared', 0, 1_000_000)))
    .addOption(new Option('--handshake-limit <seconds>', 'drop a client silent this long (no whole option) before choosing an export (0 = never)').default(DEFAULT_HANDSHAKE_TIMEOUT_MS / 1000).argParser(int('--handshake-limit', 0, 86_400)))
    .addOption(new Option('--port <port>', 'TCP port (0 = any free port)').default(DEFAULT_NBD_PORT).argParser(int('--port', 0, 65535)))
    .option('--bind <addr>', 'listen on this address (repeatable; IPv6 too, e.g. ::1 or ::); default 127.0.0.1 only',
      (v: string, prev: string[] | undefined) => [...(prev ?? []), bareHost(v)])
    .option('--socket <path>', 'listen on a Unix socket instead of TCP')
    .addOption(new Option('--tls <mode>', 'TLS: off, on (clients choose), require (NBD_REP_ERR_TLS_REQD to clients without it)').choices(['off', 'on', 'require']).default('off'))
    .option('--tls-psk <file>', 'pre-shared keys: a file of username:hexkey lines (as psktool writes them and nbdkit --tls-psk reads them)')
    .option('--tls-certificates <dir>', 'X.509: DIR/ca-cert.pem, server-cert.pem, server-key.pem (as nbdkit and qemu-nbd lay them out)')
    .option('--tls-verify-peer', 'with --tls-certificates: only clients with a certificate signed by DIR/ca-cert.pem')
    .option('--pid-file <path>', 'write the process ID here once clients may connect (removed on a clean stop)')
    .option('--exit-with-parent', 'stop (cleanly, as on SIGTERM) when the parent process exits')
    .option('--log <dest>', 'stderr (human lines; the default), json (JSON lines on stderr, as --json), or a FILE for JSON lines; under systemd stderr goes to the journal (no syslog writer of our own)')
    .option('--json', 'structured JSON log lines on stderr instead of a live status line')
    .option('--metrics <port>', 'Prometheus metrics at http://127.0.0.1:PORT/metrics', int('--metrics', 0, 65535))
    .option('--migrate-every <seconds>', 'move the disks to a fresh driver domain with random features this often (SIGUSR2: move now)', (v) => {
      const n = Number(v);
      if (!(n > 0)) throw new InvalidArgumentError('--migrate-every takes a positive number of seconds');
      return n;
    })
    .option('--data-dir <dir>', `where default images live (default ${defaultDataDir()})`)
    .addHelpText('after', `
Prints "ready nbd://127.0.0.1:PORT/NAME" (or "ready nbd+unix:///NAME?socket=PATH"), NAME being the
default export (the first image's), once clients may connect, e.g.
  qemu-img info nbd://127.0.0.1:${DEFAULT_NBD_PORT}/vbd0
  nbdcopy disk.raw nbd://127.0.0.1:${DEFAULT_NBD_PORT}/vbd0
Names and descriptions go with the images in order (as qemu-nbd's -x and -D, once per image):
  blkif serve a.img b.img -x sys -D 'system disk' -x data     (exports "sys" and "data"; nbdinfo --list)
Limits are on by default (as qemu-nbd 9.1): at most --shared=${DEFAULT_MAX_CONNECTIONS} clients at once, each dropped if it
is silent for --handshake-limit=${DEFAULT_HANDSHAKE_TIMEOUT_MS / 1000} seconds before choosing an export; a client past the cap is
told "server busy" (NBD_REP_ERR_POLICY) and closed, while those being served carry on.
With --tls=require the URI is nbds:// (with a PSK file: nbds://USER@HOST:PORT/?tls-psk-file=FILE, as
libnbd takes it), e.g. beyond loopback:
  blkif serve --tls=require --tls-psk=keys.psk --bind ::
  nbdinfo 'nbds://alice@HOST/?tls-psk-file=keys.psk'
  qemu-img info --object tls-creds-psk,id=tls0,endpoint=client,dir=DIR,username=alice \\
    --image-opts driver=nbd,host=HOST,port=${DEFAULT_NBD_PORT},tls-creds=tls0     (DIR holds keys.psk)
A non-loopback --bind without --tls=require prints a warning. Under systemd socket activation
(LISTEN_FDS/LISTEN_PID) it serves the sockets it is given instead of --bind/--port/--socket.
Remote images may be TLS too: nbds://USER@HOST/EXPORT?tls-psk-file=FILE or ?tls-certificates=DIR.
Growing an image while serving (e.g. truncate -s +1G IMAGE) resizes the disk online: the
backend rewrites "sectors" and the guest picks it up (NBD clients see the new size on reconnect).
Ctrl-C or SIGTERM: stop accepting, finish in-flight I/O, flush, close the devices, exit 0.`)
    .action(async (images: string[], opts: ServeOptions) => serve(images, opts));
}

type LogLine = (msg: string, fields?: Record<string, unknown>) => void;

/**
 * Where serve's lines go (--log, --json): human lines on stderr (after clearing a live status
 * line on a terminal), or JSON lines on stderr or in a file; warnings also reach a terminal.
 */
function serveLog(o: ServeOptions): { info: LogLine; warn: LogLine; jlog: Logger | undefined; json: boolean; tty: boolean; clearLine: () => string } {
  const logTo = o.log ?? (o.json === true ? 'json' : 'stderr');
  const json = logTo !== 'stderr';
  const jlog = json
    ? pino({ base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime },
      pino.destination(logTo === 'json' ? 2 : { dest: resolve(logTo), append: true, mkdir: true, sync: true }))
    : undefined;
  const tty = !json && process.stderr.isTTY === true;
  const clearLine = () => (tty ? '\r\x1b[K' : '');
  const info: LogLine = (msg, fields = {}) => {
    if (jlog !== undefined) jlog.info(fields, msg);
    else process.stderr.write(`${clearLine()}blkif: ${msg}\n`);
  };
  const warn: LogLine = (msg, fields = {}) => {
    if (jlog !== undefined) jlog.warn(fields, msg);
    // A warning also reaches a terminal when the log goes to a file.
    if (jlog === undefined || logTo !== 'json') process.stderr.write(`${clearLine()}blkif: ${msg}\n`);
  };
  return { info, warn, jlog, json, tty, clearLine };
}

async function serve(images: string[], o: ServeOptions): Promise<void> {
  const { info, warn, jlog, json, tty, clearLine } = serveLog(o);
  const tls = serverTls(o);
  const listen = listenAddresses(o, inheritedSockets());

  const size = o.size === undefined ? undefined : parseSize(o.size, '--size');
  const sectorSize = o.sectorSize as 512 | 4096;
  const readOnly = o.readonly === true;
  let storage: StorageSpec[];
  try {
    storage = exportStorage({
      images, sectorSize, readOnly, connections: o.connections,
      dataDir: o.dataDir !== undefined ? resolve(o.dataDir) : defaultDataDir(),
      ...(o.vbds !== undefined ? { vbds: o.vbds } : {}),
    });
  } catch (e) {
    asUsage(e);
  }
  const exportNames = exportNamesFor(storage.length, o);
  // Each image file's share of libuv's threadpool, the pool being what the blkif executable sized
  // it to (threadpool.cts): a stalled image then holds its share, never every thread.
  const handles = imageHandles(storage.filter((s) => s.kind === 'file').length, o.queueThreads === true, o.queues);
  const threads = effectiveThreadpool(process.env.UV_THREADPOOL_SIZE);
  const pool = serveThreadpoolShare(threads, handles);
  if (pool.tight) warn(`libuv's threadpool has ${threads} threads: too few for ${handles} image file handles should their disks stall (run the blkif executable, which sizes it, or set UV_THREADPOOL_SIZE=${handles * pool.slots + SPARE_THREADS})`);
  storage = storage.map((s) => (s.kind === 'file' ? { ...s, poolSlots: pool.slots } : s));
  const prepared = await prepareImages(storage, { ...(size !== undefined ? { size } : {}), force: o.force === true, createIfMissing: images.length === 0 })
    .catch(asUsage);
  for (const p of prepared) info(p.done, { image: p.image });

  // Slower (about half the throughput without persistent grants), so only when asked (or under node --test).
  if (checkedByDefault()) info('checked hypervisor: Xen protocol violations are recorded and fail the stop (BLKIF_XEN_CHECKED)');
  const exp = await DiskExport.start({
    images: storage,
    exportNames,
    limits: { maxConnections: o.shared, handshakeTimeoutMs: o.handshakeLimit * 1000 },
    readOnly: o.readonly === true,
    backendOptions: { maxIndirectSegments: o.maxIndirectSegments, persistent: o.persistent, grantCopy: o.grantCopy === true, queueThreads: o.queueThreads === true },
    frontendOptions: { maxIndirectSegments: o.maxIndirectSegments, ringPageOrder: o.ringPageOrder, queues: o.queues, persistent: o.persistent },
    listen,
    ...(tls !== undefined ? { tls } : {}),
    log: (domid, msg) => info(msg, { domid }),
    progress: (step) => info(step),
  }).catch((e: Error) => {
    const busy = /EADDRINUSE/.test(e.message) ? ` (is another server on port ${o.port}? try --port 0)` : '';
    if (e instanceof NbdTlsConfigError) throw new UsageError(e.message);
    throw new UsageError(`cannot start: ${e.message}${busy}`);
  });

  const metrics = o.metrics !== undefined ? await startMetrics(o.metrics, () => exp.status()) : undefined;
  if (metrics !== undefined) {
    const a = metrics.address();
    info(`metrics at http://127.0.0.1:${typeof a === 'object' && a !== null ? a.port : o.metrics}/metrics`);
  }
  const uris = exp.addresses.map((a) => clientUri(a, exp.exportNames[0]!, o));
  for (const a of exp.addresses) {
    if ('path' in a) continue; // a Unix socket reaches only this machine
    const w = exposureWarning(a.host, o.tls, o.readonly === true);
    if (w !== undefined) warn(w, { address: a.host });
  }
  for (const u of uris.slice(1)) info(`also at ${u}`, { uri: u });
  // Called once the signal handlers are in place: whoever acts on the PID file or the ready line
  // may send SIGTERM at once.
  const announce = () => {
    if (o.pidFile !== undefined) writePidFile(resolve(o.pidFile));
    process.stdout.write(`ready ${uris[0]}\n`);
    jlog?.info({ uri: uris[0], uris, exports: exp.exportNames, tls: o.tls }, 'ready');
  };

  // Migration on a timer or on SIGUSR2: clients keep working; each move is logged with what changed.
  const migrate = () => {
    void exp.migrate().then(
      (lines) => { for (const l of lines) info(`migrated ${l}`); },
      (e: Error) => info(`migration failed: ${e.message}`),
    );
  };
  process.on('SIGUSR2', migrate);
  const mover = o.migrateEvery !== undefined ? setInterval(migrate, o.migrateEvery * 1000) : undefined;

  // The counters are read only for someone: the live line on a terminal every second, a JSON
  // status record every 5 s (rates over those 5 s); plain lines to a file or pipe have no status.
  const meter = new RateMeter();
  const statusEvery = tty ? 1000 : json ? 5000 : 0;
  const timer = statusEvery === 0 ? undefined : setInterval(() => {
    void exp.status().then((s) => {
      const r = meter.sample(s);
      if (tty) process.stderr.write(`${clearLine()}${formatRates(r)}`);
      else jlog!.info({ ...r }, 'status');
    }, () => undefined);
  }, statusEvery);
  // The first record's rates then cover its whole period.
  if (timer !== undefined) void exp.status().then((s) => meter.sample(s), () => undefined);

  let unwatch: (() => void) | undefined;
  await new Promise<void>((done) => {
    let signals = 0;
    const onSignal = (sig: NodeJS.Signals | 'parent exited') => {
      if (++signals > 1) {
        process.stderr.write(`${clearLine()}blkif: ${sig} again: exiting now\n`);
        process.exit(130);
      }
      clearInterval(timer);
      clearInterval(mover);
      unwatch?.();
      process.off('SIGUSR2', migrate);
      info(`${sig}: stopping${sig === 'parent exited' ? '' : ' (again to force)'}`);
      void exp.stop((step) => info(step)).then(
        () => done(),
        (e: Error) => { info(`stopping failed: ${e.message}`); process.exitCode = 1; done(); },
      );
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    if (o.exitWithParent === true) unwatch = watchParent(() => onSignal('parent exited'));
    announce();
  });
  await new Promise<void>((r) => (metrics === undefined ? r() : metrics.close(() => r())));
  if (o.pidFile !== undefined) removePidFile(resolve(o.pidFile));
  info('stopped');
  jlog?.flush();
}

/** What the export's set-up refuses is reported as a usage error. */
function asUsage(e: unknown): never {
  throw e instanceof ExportSetupError ? new UsageError(e.message) : e;
}

/** An export name or description as the NBD spec allows strings: at most 4096 bytes, no NUL. */
function exportText(v: string, flag: string): string {
  if (v === '' && flag === '--export-name') throw new InvalidArgumentError('an export name cannot be empty (the empty name already means the default export)');
  if (v.includes('\0') || Buffer.byteLength(v) > NBD_MAX_STRING) throw new InvalidArgumentError(`${flag} takes at most ${NBD_MAX_STRING} bytes of text without NUL`);
  return v;
}

/** Each VBD's -x/--export-name and -D/--description: the Nth of each goes with the Nth image. */
function exportNamesFor(vbds: number, o: ServeOptions): { name?: string; description?: string }[] {
  const names = o.exportName ?? [];
  const descriptions = o.description ?? [];
  for (const [flag, given] of [['--export-name', names], ['--description', descriptions]] as const) {
    if (given.length > vbds) throw new UsageError(`${given.length} ${flag} for ${vbds} image(s): give at most one per image, in the order of the images`);
  }
  const all = Array.from({ length: vbds }, (_, i) => names[i] ?? `vbd${i}`);
  const twice = all.find((n, i) => all.indexOf(n) !== i);
  if (twice !== undefined) throw new UsageError(`two exports named ${JSON.stringify(twice)}: export names must differ`);
  return Array.from({ length: vbds }, (_, i) => ({
    ...(names[i] !== undefined ? { name: names[i] } : {}),
    ...(descriptions[i] !== undefined ? { description: descriptions[i] } : {}),
  }));
}

/** The TLS configuration from --tls, --tls-psk, --tls-certificates, --tls-verify-peer; undefined when off. */
function serverTls(o: ServeOptions): NbdServerTlsConfig | undefined {
  const creds = o.tlsPsk !== undefined || o.tlsCertificates !== undefined;
  if (o.tls === 'off') {
    if (creds || o.tlsVerifyPeer === true) throw new UsageError('--tls-psk, --tls-certificates and --tls-verify-peer need --tls=on or --tls=require');
    return undefined;
  }
  if (!creds) throw new UsageError(`--tls=${o.tls} needs --tls-psk=FILE or --tls-certificates=DIR`);
  if (o.tlsPsk !== undefined && o.tlsCertificates !== undefined) throw new UsageError('give --tls-psk or --tls-certificates, not both');
  if (o.tlsVerifyPeer === true && o.tlsCertificates === undefined) throw new UsageError('--tls-verify-peer goes with --tls-certificates (a PSK already proves the client)');
  try {
    const credentials = loadServerTls({
      ...(o.tlsPsk !== undefined ? { psk: resolve(o.tlsPsk) } : {}),
      ...(o.tlsCertificates !== undefined ? { certificates: resolve(o.tlsCertificates) } : {}),
      verifyPeer: o.tlsVerifyPeer === true,
    });
    return { mode: o.tls, credentials };
  } catch (e) {
    if (e instanceof NbdTlsConfigError) throw new UsageError(e.message);
    throw e;
  }
}

/** Inherited sockets (socket activation), else --socket, else every --bind on --port (default 127.0.0.1). */
function listenAddresses(o: ServeOptions, inherited: number[] | undefined): NbdListenOptions[] {
  if (inherited !== undefined) {
    if (o.socket !== undefined || o.bind !== undefined) throw new UsageError('socket activation (LISTEN_FDS) gives the sockets: --bind and --socket do not apply');
    return inherited.map((fd) => ({ fd }));
  }
  if (o.socket !== undefined) {
    if (o.bind !== undefined) throw new UsageError('--bind is for TCP; --socket listens on a Unix socket');
    return [{ path: resolve(o.socket) }];
  }
  const binds = o.bind ?? ['127.0.0.1'];
  // Linux's :: takes IPv4 too (dual stack), which would collide with 0.0.0.0 on the same port:
  // with both, :: keeps to IPv6.
  const both = binds.includes('::') && binds.includes('0.0.0.0');
  return binds.map((host) => ({ host, port: o.port, ...(both && host === '::' ? { ipv6Only: true } : {}) }));
}

/** The URI clients use for export `name` at `a`: nbds:// when TLS is required, with the PSK file's first user and path. */
function clientUri(a: NbdAddress, name: string, o: ServeOptions): string {
  if (o.tls !== 'require') return nbdUri(a, name);
  if (o.tlsPsk === undefined) return nbdUri(a, name, {});
  const file = resolve(o.tlsPsk);
  const user = readFileSync(file, 'utf8').split('\n').find((l) => l.includes(':'))?.split(':')[0];
  return nbdUri(a, name, { ...(user !== undefined ? { user } : {}), query: `tls-psk-file=${encodeURIComponent(file).replace(/%2F/g, '/')}` });
}
