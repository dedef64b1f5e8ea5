/**
 * blkif's blkback on a real Xen: `blkif xen-backend` runs in dom0 (no kernel xen-blkback loaded)
 * and serves the disks `xl create` hands it through the disk line the README gives
 * (`script=xen/scripts/blkif-vbd`), to Linux 6.1 PV guests whose own xen-blkfront drives them.
 * Every guest writes and reads with checksums verified from both sides; blkback's counters say
 * what the two sides negotiated; once each guest is gone, nothing stays mapped or bound.
 * One boot serves every case, one guest after another.
 */
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkGuestIo, guestIoScript, makeImage } from './guest-io.js';
import { bootXen, DOM0_PRELUDE, results, rigImages, workDir, writeDomuRamdisk, writeScript, type XenRun } from './rig.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url)).replace(/\/$/, '');

/** One guest: its name, blkfront's module parameters, blkif xen-backend's options. */
interface Case {
  readonly name: string;
  readonly blkfront: string;
  readonly backend: string;
  readonly vcpus?: number;
}

const CASES: readonly Case[] = [
  { name: 'defaults', blkfront: '', backend: '' },
  { name: 'indirect256', blkfront: 'max_indirect_segments=256', backend: '' },
  { name: 'plain', blkfront: 'max_indirect_segments=256', backend: '--max-indirect-segments 0 --no-persistent' },
];

interface Outcome {
  readonly report: [string, string[]][];
  readonly counters: Record<string, number> | undefined;
  readonly held: string | undefined;
}

let run: XenRun | undefined;
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
vcpus = ${c.vcpus ?? 1}
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, script=${ROOT}/xen/scripts/blkif-vbd, target=/tmp/work/${c.name}.img" ]
`;
}

before(async () => {
  const img = rigImages();
  work = workDir('blkif-blkback');
  let script = `${DOM0_PRELUDE}
run_case() {
  name=$1; shift
  node ${ROOT}/dist/src/cli/blkif.cjs xen-backend "$@" > /tmp/work/$name.backend.out 2> /tmp/work/$name.backend.log &
  bpid=$!
  wait_for "blkif xen-backend ready" 90 grep -q ready /tmp/work/$name.backend.out || { cat /tmp/work/$name.backend.log; kill $bpid; return 1; }
  xl create /tmp/work/$name.cfg > /tmp/work/$name.xl.log 2>&1 || { echo "RIG: xl create $name failed"; cat /tmp/work/$name.xl.log; rig_diag; kill $bpid; return 1; }
  wait_for "guest $name's end" 150 sh -c "! xl list $name" || { rig_diag; xl destroy $name; }
  wait_for "blkif letting go of $name's disk" 30 grep -q "let go" /tmp/work/$name.backend.log || rig_diag
  kill -TERM $bpid; wait $bpid
  echo "RIG: case $name done"
}
`;
  for (const c of CASES) {
    images.set(c.name, makeImage(join(work, `${c.name}.img`)));
    writeDomuRamdisk(join(work, `${c.name}.cpio`), guestIoScript(c.blkfront));
    writeScript(join(work, `${c.name}.cfg`), guestCfg(c, img.inputs.vmlinuz));
    script += `run_case ${c.name} ${c.backend}\n`;
  }
  writeScript(join(work, 'dom0.sh'), script);
  try {
    run = await bootXen(work, 280_000);
    process.stderr.write(`real Xen rig: dom0 up ${run.dom0UpSeconds?.toFixed(1)} s, ${CASES.length} guests done ${run.seconds.toFixed(1)} s after QEMU started\n`);
  } catch (e) {
    bootError = e as Error;
    return;
  }
  for (const c of CASES) {
    const read = (f: string) => { try { return readFileSync(join(work, f), 'latin1'); } catch { return ''; } };
    const backendLog = read(`${c.name}.backend.log`);
    const m = /: counters (\{.*\})$/m.exec(backendLog);
    const held = /^blkif: exiting: held (.*)$/m.exec(backendLog);
    outcomes.set(c.name, {
      report: results(read(`console/guest-${c.name}.log`)),
      counters: m === null ? undefined : JSON.parse(m[1]!) as Record<string, number>,
      held: held?.[1],
    });
  }
}, { timeout: 290_000 });

function outcome(c: Case): Outcome {
  if (bootError !== undefined) throw bootError;
  const o = outcomes.get(c.name);
  assert.ok(o !== undefined && o.report.length > 0, `guest ${c.name} reported nothing; dom0.log:\n${readFileSync(join(work, 'dom0.log'), 'utf8').slice(-3000)}`);
  assert.ok(o.counters !== undefined, `blkif xen-backend logged no counters for ${c.name}:\n${readFileSync(join(work, `${c.name}.backend.log`), 'utf8').slice(-3000)}`);
  return o;
}

const param = (o: Outcome, p: string) => o.report.find(([k, v]) => k === 'param' && v[0] === p)?.[1][1];

describe('real Xen: Linux blkfront in a domU -> blkif xen-backend in dom0', () => {
  test('defaults: 4 KiB random and 1 MiB sequential verified both ways, indirect requests (Linux asks 32), persistent grants, nothing left held', () => {
    const c = CASES[0]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(param(o, 'max_indirect_segments'), '32');
    assert.ok(o.counters!.indirect_req > 0, `indirect requests seen: ${JSON.stringify(o.counters)}`);
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

  test('ours with indirect off and no persistent grants: verified, no indirect request, no persistent grant', () => {
    const c = CASES[2]!;
    const o = outcome(c);
    checkGuestIo(o.report, join(work, `${c.name}.img`), images.get(c.name)!);
    assert.equal(o.counters!.indirect_req, 0);
    assert.equal(o.counters!.persistent_grants_peak, 0);
    assert.equal(o.held, 'mapped=0 bound=0');
  });

  test('the work directory goes when every case passed', () => {
    for (const c of CASES) outcome(c);
    rmSync(work, { recursive: true, force: true });
  });
});
