// Benchmarks of the emulated hypervisor's data path: event-channel notify -> wake latency
// between two worker domains (polling off and on), grant map+unmap rate, grant copy bandwidth.
// This file is also the worker script of the two ping-pong domains.
import { isMainThread, parentPort } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import {
  attachDomain, Hypervisor, DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_host_map, GNTST_okay,
  XEN_PAGE_SIZE, type GntCopyOp, type XenDomain,
} from '../src/xen/index.js';

export interface BenchResult { name: string; value: number; unit: string }

type PingCmd =
  | { readonly role: 'initiator'; readonly peer: number; readonly rounds: number; readonly warmup: number }
  | { readonly role: 'responder'; readonly peer: number; readonly port: number; readonly events: number }
  | { readonly role: 'idle'; readonly idleMs: number; readonly pollMicros: number };
type PingReply = { readonly port: number } | { readonly ready: true } | { readonly elapsedMs: number }
  | { readonly cpuMicros: number; readonly elu: number; readonly elapsedMs: number };

async function pingDomain(): Promise<void> {
  const xen = await attachDomain();
  const port = parentPort!;
  const cmd = await new Promise<PingCmd>((r) => port.once('message', r));
  const post = (m: PingReply) => port.postMessage(m);
  if (cmd.role === 'idle') {
    // A wait nothing ends but its abort: the CPU it burns is what idling costs.
    const ac = new AbortController();
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    const elu0 = performance.eventLoopUtilization();
    setTimeout(() => ac.abort(), cmd.idleMs);
    await xen.events.wait({ pollMicros: cmd.pollMicros, signal: ac.signal });
    const cpu = process.cpuUsage(cpu0);
    post({ cpuMicros: cpu.user + cpu.system, elu: performance.eventLoopUtilization(elu0).utilization, elapsedMs: performance.now() - t0 });
    return;
  }
  if (cmd.role === 'responder') {
    const p = xen.events.bindInterdomain(cmd.peer, cmd.port);
    await xen.events.wait(); // the bind-time event (Xen marks a fresh binding pending)
    post({ ready: true });
    for (let n = 0; n < cmd.events; n++) {
      await xen.events.wait();
      xen.events.notify(p);
    }
    // Stay until the bench has read the counters: a domain whose script ended is reaped, and its
    // counters with it.
    await new Promise((r) => port.once('message', r));
    xen.events.close(p);
    return;
  }
  const p = xen.events.allocUnbound(cmd.peer);
  post({ port: p });
  await new Promise((r) => port.once('message', r)); // responder is bound and ready
  for (let i = 0; i < cmd.warmup; i++) { xen.events.notify(p); await xen.events.wait(); }
  const t0 = performance.now();
  for (let i = 0; i < cmd.rounds; i++) { xen.events.notify(p); await xen.events.wait(); }
  post({ elapsedMs: performance.now() - t0 });
  await new Promise((r) => port.once('message', r)); // the bench has read the counters (as the responder)
  // Not waiting for the responder's close: its last notify and the close's pending bit can
  // coalesce into the event the last round already consumed (events coalesce, as on Xen), and
  // such a wait never returns. Every round trip is done; both ends just close.
  xen.events.close(p);
}

function nextMessage<T>(w: import('node:worker_threads').Worker): Promise<T> {
  return new Promise((resolve, reject) => {
    w.once('message', (m: T) => resolve(m));
    w.once('error', reject);
  });
}

/** Round trips between two worker domains; returns one-way latency (us) and poll statistics. */
async function pingPong(pollMicros: number, rounds: number): Promise<{ oneWayMicros: number; pollHits: number; sleeps: number; roundTrips: number }> {
  const hv = new Hypervisor({ dom0MemoryPages: 1 });
  try {
    const script = new URL(import.meta.url);
    const a = await hv.createDomain({ script, memoryPages: 1, pollMicros, workerData: 'xen-bench' });
    const b = await hv.createDomain({ script, memoryPages: 1, pollMicros, workerData: 'xen-bench' });
    const warmup = Math.min(1000, rounds);
    a.worker.postMessage({ role: 'initiator', peer: b.domid, rounds, warmup } satisfies PingCmd);
    const { port } = await nextMessage<{ port: number }>(a.worker);
    b.worker.postMessage({ role: 'responder', peer: a.domid, port, events: rounds + warmup } satisfies PingCmd);
    await nextMessage(b.worker);
    const before = [hv.domainCounters(a.domid)!, hv.domainCounters(b.domid)!];
    const done = nextMessage<{ elapsedMs: number }>(a.worker);
    a.worker.postMessage('go');
    const { elapsedMs } = await done;
    const after = [hv.domainCounters(a.domid)!, hv.domainCounters(b.domid)!];
    a.worker.postMessage('bye');
    b.worker.postMessage('bye');
    const pollHits = after[0]!.pollHits + after[1]!.pollHits - before[0]!.pollHits - before[1]!.pollHits;
    const sleeps = after[0]!.sleeps + after[1]!.sleeps - before[0]!.sleeps - before[1]!.sleeps;
    await Promise.all([a.exited, b.exited]);
    // The counters span the warm-up rounds too.
    return { oneWayMicros: (elapsedMs * 1000) / rounds / 2, pollHits, sleeps, roundTrips: rounds + warmup };
  } finally {
    await hv.shutdown();
  }
}

/** One domain idle in a wait for `idleMs`: the CPU it used (process-wide) and its event-loop utilization. */
async function idleWait(idleMs: number, pollMicros: number): Promise<{ cpuPercent: number; eluPercent: number }> {
  const hv = new Hypervisor({ dom0MemoryPages: 1 });
  try {
    const d = await hv.createDomain({ script: new URL(import.meta.url), memoryPages: 1, pollMicros, workerData: 'xen-bench' });
    const done = nextMessage<{ cpuMicros: number; elu: number; elapsedMs: number }>(d.worker);
    d.worker.postMessage({ role: 'idle', idleMs, pollMicros } satisfies PingCmd);
    const r = await done;
    await d.exited;
    return { cpuPercent: (100 * r.cpuMicros) / (r.elapsedMs * 1000), eluPercent: 100 * r.elu };
  } finally {
    await hv.shutdown();
  }
}

function timeLoop(minMs: number, body: () => number): { ops: number; ms: number } {
  let ops = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < minMs) {
    ops += body();
    t = performance.now();
  }
  return { ops, ms: t - t0 };
}

function grantBench(ms: number): BenchResult[] {
  const hv = new Hypervisor({ dom0MemoryPages: 64 });
  const front: XenDomain = hv.createLocalDomain({ memoryPages: 64 });
  const back = hv.dom0;
  const frames = front.memory.alloc(11);
  const refs = frames.map((f) => front.grants.grantAccess(back.domid, f, false));
  const out: BenchResult[] = [];
  // Single map + unmap.
  const single = timeLoop(ms, () => {
    for (let i = 0; i < 1000; i++) {
      const m = back.grants.mapGrant(front.domid, refs[0]!, false);
      if (m.status !== GNTST_okay) throw new Error(`map ${m.status}`);
      back.grants.unmapGrant(m.handle);
    }
    return 1000;
  });
  out.push({ name: 'xen grant map+unmap (single)', value: Math.round(single.ops / (single.ms / 1000)), unit: 'pairs/s' });
  // Batched: 11 segments mapped and unmapped at once, as blkback does per request.
  const ops = refs.map((ref) => ({ dom: front.domid, ref, flags: GNTMAP_host_map }));
  const batched = timeLoop(ms, () => {
    for (let i = 0; i < 100; i++) {
      const res = back.grants.map(ops);
      back.grants.unmap(res.map((r) => r.handle));
    }
    return 100 * ops.length;
  });
  out.push({ name: 'xen grant map+unmap (batch of 11)', value: Math.round(batched.ops / (batched.ms / 1000)), unit: 'pairs/s' });
  // Grant copy: whole pages from 11 grants into local memory, and back.
  const local = back.memory.alloc(11);
  const copyIn: GntCopyOp[] = refs.map((ref, i) => ({
    source: { ref, domid: front.domid, offset: 0 }, dest: { gmfn: local[i]!, domid: DOMID_SELF, offset: 0 },
    len: XEN_PAGE_SIZE, flags: GNTCOPY_source_gref,
  }));
  const copyOut: GntCopyOp[] = refs.map((ref, i) => ({
    source: { gmfn: local[i]!, domid: DOMID_SELF, offset: 0 }, dest: { ref, domid: front.domid, offset: 0 },
    len: XEN_PAGE_SIZE, flags: GNTCOPY_dest_gref,
  }));
  for (const [name, batch] of [['from grant', copyIn], ['to grant', copyOut]] as const) {
    const r = timeLoop(ms, () => {
      for (let i = 0; i < 100; i++) if (back.grants.copy(batch)[0] !== GNTST_okay) throw new Error('copy failed');
      return 100 * batch.length * XEN_PAGE_SIZE;
    });
    out.push({ name: `xen grant copy ${name} (4 KiB ops, batch of 11)`, value: Math.round(r.ops / (1 << 20) / (r.ms / 1000)), unit: 'MiB/s' });
  }
  for (const ref of refs) front.grants.endAccess(ref);
  void hv.shutdown();
  return out;
}

/** The emulated hypervisor's benchmarks (wired into `npm run bench` by bench/run.ts). */
export async function benchXen(quick = false): Promise<BenchResult[]> {
  const results: BenchResult[] = [];
  const off = await pingPong(0, quick ? 1000 : 5000);
  results.push({ name: 'xen notify->wake latency, polling off (one way)', value: round2(off.oneWayMicros), unit: 'us' });
  const on = await pingPong(50, quick ? 4000 : 20000);
  results.push({ name: 'xen notify->wake latency, polling 50 us (one way)', value: round2(on.oneWayMicros), unit: 'us' });
  const waits = on.pollHits + on.sleeps;
  results.push({ name: 'xen polling saved a sleep (polling 50 us)', value: round2(waits === 0 ? 0 : (100 * on.pollHits) / waits), unit: '% of waits' });
  results.push({ name: 'xen sleeps per round trip, polling off (both domains)', value: round2(off.sleeps / off.roundTrips), unit: 'sleeps' });
  results.push({ name: 'xen sleeps per round trip, polling 50 us (both domains)', value: round2(on.sleeps / on.roundTrips), unit: 'sleeps' });
  // An idle domain sleeps instead of spinning (test/xen/domains.test.ts checks it sleeps once).
  const idle = await idleWait(quick ? 200 : 1000, 50);
  results.push({ name: 'xen idle wait, CPU used (polling 50 us)', value: round2(idle.cpuPercent), unit: '% of a core' });
  results.push({ name: 'xen idle wait, event-loop utilization (polling 50 us)', value: round2(idle.eluPercent), unit: '%' });
  results.push(...grantBench(quick ? 100 : 300));
  return results;
}

const round2 = (x: number) => Math.round(x * 100) / 100;

if (!isMainThread) {
  const { workerData } = await import('node:worker_threads');
  if ((workerData as { app?: unknown } | undefined)?.app === 'xen-bench') await pingDomain();
} else if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const r of await benchXen()) console.log(`${r.name}: ${r.value} ${r.unit}`);
}
