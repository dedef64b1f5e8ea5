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
import { fileURLToPath } from 'node:url';
import { checkGuestIo, guestIoScript, guestReadOnlyScript, makeImage, sha256 } from './guest-io.js';
import { bootXen, DOM0_PRELUDE, results, rigImages, workDir, writeDomuRamdisk, writeScript } from './rig.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url)).replace(/\/$/, '');

/** One guest: its name, blkfront's module parameters, its scenario, the disk's access. */
interface Case {
  readonly name: string;
  readonly blkfront: string;
  readonly readOnly?: boolean;
}

/** Backend processes, each with its options and the guests it serves in turn. */
const GROUPS: readonly { readonly backend: string; readonly cases: readonly Case[] }[] = [
  {
    backend: '',
    cases: [
      { name: 'defaults', blkfront: '' },
      { name: 'indirect256', blkfront: 'max_indirect_segments=256' },
      { name: 'readonly', blkfront: '', readOnly: true },
    ],
  },
  { backend: '--max-indirect-segments 0 --no-persistent', cases: [{ name: 'plain', blkfront: 'max_indirect_segments=256' }] },
];
const CASES = GROUPS.flatMap((g) => g.cases);

interface Outcome {
  readonly report: [string, string[]][];
  readonly counters: Record<string, number> | undefined;
  /** What the backend still held right after it let go of this guest's disk. */
  readonly held: string | undefined;
  /** What the backend held as it exited. */
  readonly heldAtExit: string | undefined;
}

let work = '';
let bootError: Error | undefined;
const images = new Map<string, string>();
const outcomes = new Map<string, Outcome>();

function guestCfg(c: Case, vmlinuz: string): string {
  return `type = "pv"
name = "${c.name}"
kernel = "${vmlinuz}"
ramdisk = "/tmp/work/${c.name}.cpio"
extra = "console=hvc0 loglevel=4"
memory = 192
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=${c.readOnly === true ? 'ro' : 'rw'}, script=${ROOT}/xen/scripts/blkif-vbd, target=/tmp/work/${c.name}.img" ]
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
  name=$1; log=$2; gone=$3
  xl create /tmp/work/$name.cfg > /tmp/work/$name.xl.log 2>&1 || { echo "RIG: xl create $name failed"; cat /tmp/work/$name.xl.log; rig_diag; return 1; }
  echo "RIG: guest $name created $(date +%s)"
  wait_for "guest $name's end" 150 sh -c "! xl list $name" || { rig_diag; xl destroy $name; }
  wait_for "blkif letting go of $name's disk" 30 sh -c "[ \\$(grep -c 'let go' /tmp/work/$log.log) -ge $gone ]" || rig_diag
  echo "RIG: guest $name gone $(date +%s)"
}
`;
  for (const [g, group] of GROUPS.entries()) {
    script += `start_backend backend${g} ${group.backend} || exit 96\n`;
    for (const [i, c] of group.cases.entries()) {
      images.set(c.name, makeImage(join(work, `${c.name}.img`)));
      writeDomuRamdisk(join(work, `${c.name}.cpio`), c.readOnly === true ? guestReadOnlyScript(c.blkfront) : guestIoScript(c.blkfront));
      writeScript(join(work, `${c.name}.cfg`), guestCfg(c, img.inputs.vmlinuz));
      script += `run_guest ${c.name} backend${g} ${i + 1}\n`;
    }
    script += 'stop_backend\n';
  }
  writeScript(join(work, 'dom0.sh'), script);
  try {
    const run = await bootXen(work, 285_000);
    process.stderr.write(`real Xen rig: dom0 up ${run.dom0UpSeconds?.toFixed(1)} s, ${CASES.length} guests done ${run.seconds.toFixed(1)} s after QEMU started\n`);
  } catch (e) {
    bootError = e as Error;
    return;
  }
  const read = (f: string) => { try { return readFileSync(join(work, f), 'latin1'); } catch { return ''; } };
  for (const [g, group] of GROUPS.entries()) {
    const log = read(`backend${g}.log`);
    const heldAtExit = /^blkif: exiting: held (.*)$/m.exec(log)?.[1];
    for (const c of group.cases) {
      // The backend names each VBD by its directory, backend/vbd/<guest's domid>/<devid>.
      const dir = new RegExp(`^blkif: (\\S+): serving /tmp/work/${escape(c.name)}\\.img`, 'm').exec(log)?.[1];
      const m = dir === undefined ? null : new RegExp(`^blkif: ${escape(dir)}: counters (\\{.*\\})\\nblkif: held (.*)$`, 'm').exec(log);
      outcomes.set(c.name, {
        report: results(read(`console/guest-${c.name}.log`)),
        counters: m === null ? undefined : JSON.parse(m[1]!) as Record<string, number>,
        held: m?.[2],
        heldAtExit,
      });
    }
  }
}, { timeout: 295_000 });

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
  test('defaults: 4 KiB random and 1 MiB sequential verified both ways, indirect requests (Linux asks 32), persistent grants, nothing left held', () => {
    const c = CASES[0]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(param(o, 'max_indirect_segments'), '32');
    assert.ok(o.counters!.indirect_req > 0, `indirect requests seen: ${JSON.stringify(o.counters)}`);
    assert.equal(o.counters!.indirect_segments / o.counters!.indirect_req <= 32, true, 'no indirect request beyond what Linux asked for');
    assert.ok(o.counters!.persistent_grants_peak > 0, 'Linux used persistent grants');
    assert.ok(o.counters!.wr_req > 0 && o.counters!.rd_req > 0);
    assert.equal(o.counters!.errors, 0);
    assert.equal(o.held, 'mapped=0 bound=0', 'every grant unmapped and every port unbound once the guest was gone');
  });

  test('Linux at 256 indirect segments: verified, indirect requests carry more than 32 segments', () => {
    const c = CASES[1]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(param(o, 'max_indirect_segments'), '256');
    assert.ok(o.counters!.indirect_req > 0);
    assert.ok(o.counters!.indirect_segments / o.counters!.indirect_req > 32, `more than 32 segments per indirect request: ${JSON.stringify(o.counters)}`);
    assert.equal(o.held, 'mapped=0 bound=0');
  });

  test('a read-only VBD (access=ro): the guest sees it read-only, reads it, its writes and discards fail, the image is unchanged', () => {
    const c = CASES[2]!;
    const o = outcome(c);
    assert.equal(value(o, 'ro'), '1', 'Linux marks the disk read-only (VDISK_READONLY)');
    assert.equal(value(o, 'read-all'), images.get(c.name), 'the guest reads the image');
    assert.equal(value(o, 'ro-write'), 'refused');
    assert.equal(value(o, 'ro-discard'), 'refused');
    assert.equal(value(o, 'read-all-after'), images.get(c.name));
    assert.equal(sha256(readFileSync(join(work, `${c.name}.img`))), images.get(c.name), 'the image file is unchanged');
    // Whatever write or discard reached blkback was answered with an error (CVE-2013-2140).
    assert.equal(o.counters!.wr_sect, 0, `nothing written: ${JSON.stringify(o.counters)}`);
    assert.ok(o.counters!.errors >= o.counters!.wr_req + o.counters!.ds_req);
    assert.equal(o.held, 'mapped=0 bound=0');
  });

  test('ours with indirect off and no persistent grants (Linux asks 256): verified, no indirect request, no persistent grant', () => {
    const c = CASES[3]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(o.counters!.indirect_req, 0);
    assert.equal(o.counters!.persistent_grants_peak, 0);
    assert.ok(o.counters!.segments / (o.counters!.rd_req + o.counters!.wr_req) <= 11, 'at most 11 segments a request');
    assert.equal(o.held, 'mapped=0 bound=0');
    assert.equal(o.heldAtExit, 'mapped=0 bound=0');
  });

  test('the work directory goes when every case passed', () => {
    for (const c of CASES) outcome(c);
    rmSync(work, { recursive: true, force: true });
  });
});
