import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  MessageParser,
  XenstoreClient,
  XenstoreDaemon,
  XenstorePageClient,
  XenstoreSocketServer,
  attachPage,
  type XenstoreDaemonOptions,
  type XenstorePageServer,
  type XsMessage,
} from '../../src/xenstore/index.js';

export interface SocketDaemon {
  daemon: XenstoreDaemon;
  server: XenstoreSocketServer;
  dir: string;
  socketPath: string;
  close(): Promise<void>;
}

/** A daemon listening on a socket in a fresh temp dir, removed by close(). */
export async function startSocketDaemon(opts: XenstoreDaemonOptions = {}): Promise<SocketDaemon> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkif-xs-'));
  const socketPath = path.join(dir, 'socket');
  const daemon = new XenstoreDaemon(opts);
  const server = await XenstoreSocketServer.listen(daemon, socketPath);
  return {
    daemon,
    server,
    dir,
    socketPath,
    close: async () => {
      await daemon.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface Guest {
  client: XenstoreClient;
  transport: XenstorePageClient;
  server: XenstorePageServer;
  page: Uint8Array;
}

/** A guest connected through a shared page, kicks delivered as microtasks. */
export function connectGuest(daemon: XenstoreDaemon, domid: number): Guest {
  const page = new Uint8Array(new SharedArrayBuffer(4096));
  let server: XenstorePageServer | undefined;
  const transport = new XenstorePageClient(page, () => queueMicrotask(() => server?.onEvent()));
  server = attachPage(daemon, domid, page, () => queueMicrotask(() => transport.onEvent()));
  return { client: new XenstoreClient(transport), transport, server, page };
}

/** A raw socket for sending arbitrary bytes and reading decoded replies. */
export class RawConnection {
  private readonly parser = new MessageParser();
  private readonly queue: XsMessage[] = [];
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (c: Buffer) => {
      this.parser.push(c);
      for (let r = this.parser.next(); r; r = this.parser.next()) if (r.kind === 'message') this.queue.push(r.message);
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(p: string): Promise<RawConnection> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(p);
      s.once('error', reject);
      s.once('connect', () => resolve(new RawConnection(s)));
    });
  }

  send(bytes: Uint8Array): void {
    this.sock.write(bytes);
  }

  async next(timeoutMs = 2000): Promise<XsMessage | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length === 0 && !this.closed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, deadline - Date.now());
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.queue.shift();
  }

  close(): void {
    this.sock.destroy();
  }
}

export function hex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
}

/** Rings doorbell `i` of a SharedArrayBuffer bell array: counts, then wakes the listening thread. */
export function ringBell(bell: Int32Array, i: number): void {
  Atomics.add(bell, i, 1);
  Atomics.notify(bell, i);
}

/**
 * Runs `onEvent` each time doorbell `i` rings, until `stop()`. A pending Atomics.waitAsync does
 * not keep the event loop alive, so a timer does while listening.
 */
export function listenBell(bell: Int32Array, i: number, onEvent: () => void): { stop(): Promise<void> } {
  let running = true;
  const keepAlive = setInterval(() => undefined, 1000);
  const loop = (async () => {
    let seen = Atomics.load(bell, i);
    while (running) {
      const r = Atomics.waitAsync(bell, i, seen);
      if (r.async) await r.value;
      seen = Atomics.load(bell, i);
      onEvent();
    }
  })();
  return {
    async stop() {
      running = false;
      clearInterval(keepAlive);
      ringBell(bell, i);
      await loop;
    },
  };
}
