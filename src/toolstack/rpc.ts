/**
 * Calls from the toolstack (main thread) into a domain's thread over its worker port: the
 * toolstack's private control channel, standing in for the hypercalls and device-model commands
 * a real toolstack uses. The PV protocol itself never travels here, only commands and test I/O.
 */
import type { EventEmitter } from 'node:events';
import type { MessagePort, Worker } from 'node:worker_threads';

/** Either end of a control channel: a domain's Worker (from the toolstack) or a MessagePort. */
export type RpcEndpoint = Worker | MessagePort;

interface Call {
  kind: 'rpc-call';
  seq: number;
  method: string;
  args: unknown[];
}
interface Reply {
  kind: 'rpc-reply';
  seq: number;
  ok: boolean;
  value?: unknown;
  error?: { name: string; message: string; code?: string };
}

/** An error thrown in the domain, carried back with its name and code. */
export class RemoteError extends Error {
  constructor(
    override readonly name: string,
    message: string,
    readonly code: string | undefined,
  ) {
    super(message);
  }
}

export type RpcHandlers = Record<string, (...args: never[]) => unknown>;

/** Domain side: answers calls with the handlers; unknown methods are errors. */
export function serveRpc(port: RpcEndpoint, handlers: RpcHandlers): void {
  (port as EventEmitter).on('message', (m: Call) => {
    if (m?.kind !== 'rpc-call') return;
    const h = handlers[m.method] as ((...args: unknown[]) => unknown) | undefined;
    const reply = (r: Omit<Reply, 'kind' | 'seq'>) => port.postMessage({ kind: 'rpc-reply', seq: m.seq, ...r } satisfies Reply);
    if (h === undefined) return reply({ ok: false, error: { name: 'Error', message: `no method ${m.method}` } });
    Promise.resolve()
      .then(() => h(...m.args))
      .then(
        (value) => reply({ ok: true, value }),
        (e: unknown) => {
          const err = e as Error & { code?: unknown };
          reply({ ok: false, error: { name: err.name ?? 'Error', message: err.message ?? String(e), code: typeof err.code === 'string' ? err.code : undefined } });
        },
      );
  });
}

/** Toolstack side: calls into one domain; calls pending when its thread ends are rejected. */
export class RpcClient {
  private seq = 0;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private gone: Error | undefined;

  constructor(private readonly worker: RpcEndpoint) {
    const ee = worker as EventEmitter;
    ee.on('message', (m: Reply) => {
      if (m?.kind !== 'rpc-reply') return;
      const p = this.pending.get(m.seq);
      if (p === undefined) return;
      this.pending.delete(m.seq);
      if (m.ok) p.resolve(m.value);
      else p.reject(new RemoteError(m.error!.name, m.error!.message, m.error!.code));
    });
    ee.once('exit', (code: number) => this.fail(new Error(`domain thread exited (code ${code})`)));
    ee.once('close', () => this.fail(new Error('control channel closed')));
  }

  call<T>(method: string, ...args: unknown[]): Promise<T> {
    if (this.gone !== undefined) return Promise.reject(this.gone);
    const seq = ++this.seq;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(seq, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ kind: 'rpc-call', seq, method, args } satisfies Call);
    });
  }

  private fail(e: Error): void {
    this.gone = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}
