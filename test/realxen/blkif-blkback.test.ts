/**
 * blkif's blkback on a real Xen: `blkif xen-backend` runs in dom0 (no kernel xen-blkback loaded)
 * and serves the disks `xl create` hands it through the disk line the README gives
 * (`script=xen/scripts/blkif-vbd`), to Linux 6.1 PV guests whose own xen-blkfront drives them.
 * Every guest writes and reads with checksums verified from both sides; blkback's counters say
 * what the two sides negotiated; once each guest is gone, nothing stays mapped or bound.
 * One boot serves every case: one backend process per set of backend options (a node start
 * under TCG takes ~30 s), its guests one after another.
 */
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { checkGuestIo, guestIoScript, makeImage, sha256 } from './guest-io.js';
import { bootXen, CHECKOUT, DOM0_PRELUDE, results, rigImages, workDir, writeDomuRamdisk, writeScript } from './rig.js';

const ROOT = CHECKOUT;

/** One guest: its name, blkfront's module parameters, its scenario, the disk's access. */
interface Case {
  readonly name: string;
  readonly blkfront: string;
  /** A second disk, xvdb, read-only (`access=ro`), image `readonly.img`. */
  readonly readOnlyXvdb?: boolean;
  readonly vcpus?: number;
  readonly memory?: number;
  /** dom0 takes the disk away with `xl block-detach` once the guest's I/O is done. */
  readonly detach?: boolean;
}

/** Backend processes, each with its options and the guests it serves in turn. */
const GROUPS: readonly { readonly backend: string; readonly cases: readonly Case[] }[] = [
  {
    backend: '',
    cases: [
      { name: 'defaults', blkfront: '', readOnlyXvdb: true },
      // Linux's persistent-grant buffers take (segments + indirect pages) x ring slots pages at
      // connect: 258 x 64 = 66 MiB for this one, hence the memory (a 4-page ring would take 132).
      { name: 'indirect256', blkfront: 'max_indirect_segments=256 max_ring_page_order=1', memory: 256 },
    ],
  },
  // Grant copy (QEMU's way: no mapping, so no persistent grants either) with indirect off.
  { backend: '--max-indirect-segments 0 --grant-copy', cases: [{ name: 'plain', blkfront: 'max_indirect_segments=256', vcpus: 2, detach: true }] },
];
const CASES = GROUPS.flatMap((g) => g.cases);

interface Outcome {
  readonly report: [string, string[]][];
  readonly counters: Record<string, number> | undefined;
  /** What the backend still held right after it let go of this guest's disks. */
  readonly held: string | undefined;
  /** What the backend held as it exited. */
  readonly heldAtExit: string | undefined;
  /** blkback's line as it connected: ABI, queues, ring order, indirect, persistent. */
  readonly connected: string | undefined;
}

let work = '';
let bootError: Error | undefined;
const images = new Map<string, string>();
/** Cases whose test passed: the work directory is kept unless all did. */
const passed = new Set<string>();
const outcomes = new Map<string, Outcome>();

function guestCfg(c: Case, vmlinuz: string): string {
  return `type = "pv"
name = "${c.name}"
kernel = "${vmlinuz}"
ramdisk = "/tmp/work/${c.name}.cpio"
extra = "console=hvc0 loglevel=4"
memory = ${c.memory ?? 128}
vcpus = ${c.vcpus ?? 1}
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, script=${ROOT}/xen/scripts/blkif-vbd, target=/tmp/work/${c.name}.img"${c.readOnlyXvdb === true ? `,
         "format=raw, vdev=xvdb, access=ro, script=${ROOT}/xen/scripts/blkif-vbd, target=/tmp/work/readonly.img"` : ''} ]
`;
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

before(async () => {
  const img = rigImages();
  work = workDir('blkif-blkback');
  let script = `${DOM0_PRELUDE}
start_backend() {
  log=$1; shift
  node ${ROOT}/dist/src/cli/blkif.cjs xen-backend "$@" > /tmp/work/$log.out 2> /tmp/work/$log.log &
  bpid=$!
  echo "RIG: backend $log started $(date +%s)"
  wait_for "blkif xen-backend ready" 120 grep -q ready /tmp/work/$log.out || { cat /tmp/work/$log.log; kill $bpid; return 1; }
  echo "RIG: backend $log ready $(date +%s)"
}
stop_backend() { kill -TERM $bpid; wait $bpid; echo "RIG: backend stopped $(date +%s)"; }
run_guest() {
  name=$1; log=$2; gone=$3; detach=\${4:-}
  xl create /tmp/work/$name.cfg > /tmp/work/$name.xl.log 2>&1 || { echo "RIG: xl create $name failed"; cat /tmp/work/$name.xl.log; rig_diag; return 1; }
  echo "RIG: guest $name created $(date +%s)"
  if [ -n "$detach" ]; then
    wait_for "guest $name's I/O" 150 grep -q "RESULT done" /tmp/work/console/guest-$name.log || rig_diag
    xl block-detach $name xvda >> /tmp/work/$name.xl.log 2>&1 || { echo "RIG: xl block-detach $name failed"; cat /tmp/work/$name.xl.log; }
    echo "RIG: guest $name's disk detached $(date +%s)"
  fi
  wait_for "guest $name's end" 150 sh -c "! xl list $name" || { rig_diag; xl destroy $name; }
  wait_for "blkif letting go of $name's disk" 30 sh -c "[ \\$(grep -c 'let go' /tmp/work/$log.log) -ge $gone ]" || rig_diag
  echo "RIG: guest $name gone $(date +%s)"
}
`;
  for (const [g, group] of GROUPS.entries()) {
    script += `start_backend backend${g} ${group.backend} || exit 96\n`;
    let lets = 0;
    for (const c of group.cases) {
      images.set(c.name, makeImage(join(work, `${c.name}.img`)));
      if (c.readOnlyXvdb === true) images.set('readonly', makeImage(join(work, 'readonly.img')));
      writeDomuRamdisk(join(work, `${c.name}.cpio`), guestIoScript(c.blkfront, { discard: true, detach: c.detach === true, readOnlyXvdb: c.readOnlyXvdb === true }));
      writeScript(join(work, `${c.name}.cfg`), guestCfg(c, img.inputs.vmlinuz));
      // A guest's disks are let go of together: count them all.
      lets += c.readOnlyXvdb === true ? 2 : 1;
      script += `run_guest ${c.name} backend${g} ${lets}${c.detach === true ? ' detach' : ''}\n`;
    }
    script += 'stop_backend\n';
  }
  writeScript(join(work, 'dom0.sh'), script);
  try {
    const run = await bootXen(work, 480_000);
    process.stderr.write(`real Xen rig: dom0 up ${run.dom0UpSeconds?.toFixed(1)} s, ${CASES.length} guests done ${run.seconds.toFixed(1)} s after QEMU started\n`);
  } catch (e) {
    bootError = e as Error;
    return;
  }
  const read = (f: string) => { try { return readFileSync(join(work, f), 'latin1'); } catch { return ''; } };
  for (const [g, group] of GROUPS.entries()) {
    const log = read(`backend${g}.log`);
    const heldAtExit = /^blkif: exiting: held (.*)$/m.exec(log)?.[1];
    for (const c of group.cases.flatMap((c) => c.readOnlyXvdb === true ? [c, { ...c, name: 'readonly', image: 'readonly' }] : [c])) {
      // The backend names each VBD by its directory, backend/vbd/<guest's domid>/<devid>.
      const image = 'image' in c ? c.image : c.name;
      const guest = 'image' in c ? group.cases.find((g) => g.readOnlyXvdb === true)!.name : c.name;
      const dir = new RegExp(`^blkif: (\\S+): serving /tmp/work/${escape(image)}\\.img`, 'm').exec(log)?.[1];
      const m = dir === undefined ? null : new RegExp(`^blkif: ${escape(dir)}: counters (\\{.*\\})\\nblkif: held (.*)$`, 'm').exec(log);
      outcomes.set(c.name, {
        report: results(read(`console/guest-${guest}.log`)),
        counters: m === null ? undefined : JSON.parse(m[1]!) as Record<string, number>,
        // After the last of the guest's disks was let go (a guest's disks go together).
        held: dir === undefined ? undefined
          : [...log.matchAll(new RegExp(`^blkif: ${escape(dir.replace(/\/\d+$/, ''))}/\\d+: counters .*\\nblkif: held (.*)$`, 'gm'))].at(-1)?.[1],
        heldAtExit,
        connected: dir === undefined ? undefined : new RegExp(`^blkif: ${escape(dir)}: .*connected: (.*)$`, 'm').exec(log)?.[1],
      });
    }
  }
}, { timeout: 510_000 });

function outcome(c: Case): Outcome {
  if (bootError !== undefined) throw bootError;
  const o = outcomes.get(c.name);
  assert.ok(o !== undefined && o.report.length > 0, `guest ${c.name} reported nothing; dom0.log:\n${readFileSync(join(work, 'dom0.log'), 'utf8').slice(-3000)}`);
  assert.ok(o.counters !== undefined, `blkif xen-backend logged no counters for ${c.name} (see ${work})`);
  assert.ok(o.report.some(([k]) => k === 'done'), `guest ${c.name} finished its scenario`);
  return o;
}

const param = (o: Outcome, p: string) => o.report.find(([k, v]) => k === 'param' && v[0] === p)?.[1][1];
const value = (o: Outcome, key: string) => o.report.find(([k]) => k === key)?.[1][0];

describe('real Xen: Linux blkfront in a domU -> blkif xen-backend in dom0', () => {
  test('defaults: 4 KiB random and 1 MiB sequential verified both ways, flush, discard reads back as zeroes, indirect requests (Linux asks 32), persistent grants, nothing left held', () => {
    const c = CASES[0]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(param(o, 'max_indirect_segments'), '32');
    assert.ok(o.counters!.indirect_req > 0, `indirect requests seen: ${JSON.stringify(o.counters)}`);
    assert.equal(o.counters!.indirect_segments / o.counters!.indirect_req <= 32, true, 'no indirect request beyond what Linux asked for');
    assert.ok(o.counters!.persistent_grants_peak > 0, 'Linux used persistent grants');
    assert.ok(o.counters!.wr_req > 0 && o.counters!.rd_req > 0);
    assert.equal(o.counters!.errors, 0, `no request refused: ${JSON.stringify(o.counters)}`);
    assert.ok(o.counters!.f_req > 0, 'the guest\'s fsync reached blkback as a flush');
    assert.ok(o.counters!.ds_req > 0, 'the guest\'s blkdiscard reached blkback as a discard');
    assert.equal(o.held, 'mapped=0 bound=0', 'every grant unmapped and every port unbound once the guest was gone');
    passed.add(c.name);
  });

  test('Linux at 256 indirect segments and a ring of 2 pages: verified, indirect requests carry more than 32 segments', () => {
    const c = CASES[1]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.match(o.connected ?? '', /1 queue\(s\), ring order 1, /);
    assert.equal(param(o, 'max_indirect_segments'), '256');
    assert.ok(o.counters!.indirect_req > 0);
    assert.ok(o.counters!.indirect_segments / o.counters!.indirect_req > 32, `more than 32 segments per indirect request: ${JSON.stringify(o.counters)}`);
    assert.equal(o.counters!.errors, 0, `no request refused: ${JSON.stringify(o.counters)}`);
    assert.equal(o.held, 'mapped=0 bound=0');
    passed.add(c.name);
  });

  test("a read-only VBD (the defaults guest's xvdb, access=ro): the guest sees it read-only, reads it, its writes and discards fail, the image is unchanged", () => {
    const c: Case = { name: 'readonly', blkfront: '' };
    const o = outcome(c);
    assert.equal(value(o, 'ro-flag'), '1', 'Linux marks the disk read-only (VDISK_READONLY)');
    assert.equal(value(o, 'ro-read-all'), images.get(c.name), 'the guest reads the image');
    assert.equal(value(o, 'ro-write'), 'refused');
    assert.equal(value(o, 'ro-discard'), 'refused');
    assert.equal(value(o, 'ro-read-all-after'), images.get(c.name));
    assert.equal(sha256(readFileSync(join(work, `${c.name}.img`))), images.get(c.name), 'the image file is unchanged');
    process.stderr.write(`read-only VBD: blkback saw wr_req ${o.counters!.wr_req}, ds_req ${o.counters!.ds_req}, errors ${o.counters!.errors}\n`);
    // Whatever write or discard reached blkback was answered with an error (CVE-2013-2140).
    assert.equal(o.counters!.wr_sect, 0, `nothing written: ${JSON.stringify(o.counters)}`);
    assert.ok(o.counters!.errors >= o.counters!.wr_req + o.counters!.ds_req);
    assert.equal(o.held, 'mapped=0 bound=0');
    passed.add(c.name);
  });

  test('ours by grant copy with indirect off (Linux asks 256), a guest of 2 vCPUs on 2 queues, then xl block-detach: verified, every segment copied, no indirect request, no persistent grant, nothing left held', () => {
    const c = CASES[2]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.match(o.connected ?? '', /2 queue\(s\), ring order 0, /);
    assert.ok(o.report.some(([k]) => k === 'detached'), 'xl block-detach took the disk from the running guest');
    assert.equal(o.counters!.indirect_req, 0);
    assert.equal(o.counters!.persistent_grants_peak, 0);
    assert.equal(o.counters!.grant_copy_ops, o.counters!.segments, `every data segment by GNTTABOP_copy: ${JSON.stringify(o.counters)}`);
    assert.ok(o.counters!.grant_copy_ops > 0);
    assert.ok(o.counters!.segments / (o.counters!.rd_req + o.counters!.wr_req) <= 11, 'at most 11 segments a request');
    assert.equal(o.counters!.errors, 0, `no request refused: ${JSON.stringify(o.counters)}`);
    assert.equal(o.held, 'mapped=0 bound=0');
    assert.equal(o.heldAtExit, 'mapped=0 bound=0');
    passed.add(c.name);
  });

  test('the work directory goes when every case passed', () => {
    // Kept otherwise: dom0.log, backend*.log, console/ and serial.log say what happened.
    if ([...CASES.map((c) => c.name), 'readonly'].every((n) => passed.has(n))) rmSync(work, { recursive: true, force: true });
  });
});
