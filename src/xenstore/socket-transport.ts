// The Unix-socket transport: the daemon's listening socket (connections are
// dom0, privileged, like xenstored's socket) and the client side.
import * as fs from 'node:fs';
import * as net from 'node:net';
import { MessageParser } from './codec.js';
import type { XenstoreDaemon } from './daemon.js';
import type { XenstoreTransport } from './transport.js';

export class XenstoreSocketServer {
  private readonly sockets = new Set<net.Socket>();
  private constructor(private readonly server: net.Server, readonly path: string) {}

  /** Listens on `path` (replacing a stale socket file) and serves `daemon`. */
  static async listen(daemon: XenstoreDaemon, path: string): Promise<XenstoreSocketServer> {
    try {
      if (fs.statSync(path).isSocket()) fs.unlinkSync(path);
    } catch {
      // no stale socket
    }
    let self: XenstoreSocketServer | undefined;
    const server = net.createServer((sock) => self!.accept(daemon, sock));
    self = new XenstoreSocketServer(server, path);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const s = self;
    daemon.onClose(() => s.close());
    return s;
  }

  private accept(daemon: XenstoreDaemon, sock: net.Socket): void {
    this.sockets.add(sock);
    const parser = new MessageParser();
    const conn = daemon.connect(0, {
      send: (bytes) => {
        if (!sock.destroyed) sock.write(bytes);
      },
      drop: () => sock.destroy(),
    });
    sock.on('data', (chunk: Buffer) => {
      parser.push(chunk);
      for (let r = parser.next(); r; r = parser.next()) {
        if (r.kind === 'oversized') {
          // xenstored drops a socket client that announces len > XENSTORE_PAYLOAD_MAX.
          conn.drop('payload too long');
          return;
        }
        conn.receive(r.message);
      }
    });
    sock.on('error', () => sock.destroy());
    sock.on('close', () => {
      this.sockets.delete(sock);
      daemon.disconnect(conn);
    });
  }

  get connectionCount(): number {
    return this.sockets.size;
  }

  close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => {
      if (!this.server.listening) return resolve();
      this.server.close(() => resolve());
    });
  }
}

export class XenstoreSocketClient implements XenstoreTransport {
  private closeCb: ((reason: Error) => void) | undefined;
  private constructor(private readonly sock: net.Socket) {
    sock.on('close', () => this.closeCb?.(new Error('xenstore socket closed')));
    sock.on('error', () => undefined);
  }

  static connect(path: string): Promise<XenstoreSocketClient> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(path);
      sock.once('error', reject);
      sock.once('connect', () => {
        sock.off('error', reject);
        resolve(new XenstoreSocketClient(sock));
      });
    });
  }

  send(bytes: Uint8Array): void {
    this.sock.write(bytes);
  }

  onData(cb: (chunk: Uint8Array) => void): void {
    this.sock.on('data', cb);
  }

  onClose(cb: (reason: Error) => void): void {
    this.closeCb = cb;
  }

  close(): void {
    this.sock.destroy();
  }
}
