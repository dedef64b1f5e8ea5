/**
 * The rig's own proof, before any of blkif runs on it: under real Xen (Xen 4.17 under QEMU/TCG),
 * a Linux PV guest that `xl create` starts reads and writes its disk through Linux's blkfront and
 * Linux's blkback in dom0, and every checksum matches from both sides. If this fails, the rig is
 * broken and no other real-Xen result means anything. About 100 s of TCG, and the two blkif files
 * exercise the same rig on every run, so it runs on request: BLKIF_REALXEN_RIGCHECK=1 (after a
 * change to the rig, or to tell a broken rig from a broken blkif).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { checkGuestIo, guestIoScript, makeImage } from './guest-io.js';
import { bootXen, DOM0_PRELUDE, LOOP_HOTPLUG, results, rigImages, workDir, writeDomuRamdisk, writeScript } from './rig.js';

const SKIP = process.env.BLKIF_REALXEN_RIGCHECK === '1' ? false
  : 'the rig\'s own proof (Linux to Linux, ~100 s of the suite\'s real-Xen budget): BLKIF_REALXEN_RIGCHECK=1 runs it';

test('real Xen: Linux blkfront in a domU -> Linux blkback in dom0, checksums verified both ways', { timeout: 450_000, skip: SKIP }, async () => {
  const img = rigImages();
  const work = workDir('linux-blkback');
  const imageSha = makeImage(join(work, 'disk.img'));
  writeDomuRamdisk(join(work, 'domu.cpio'), guestIoScript());
  writeScript(join(work, 'hotplug-loop'), LOOP_HOTPLUG);
  writeScript(join(work, 'guest.cfg'), `type = "pv"
name = "guest"
kernel = "${img.inputs.vmlinuz}"
ramdisk = "/tmp/work/domu.cpio"
extra = "console=hvc0 loglevel=4"
memory = 128
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, script=/tmp/work/hotplug-loop, target=/tmp/work/disk.img" ]
`);
  writeScript(join(work, 'dom0.sh'), `${DOM0_PRELUDE}
insmod /run/rig-modules/xen-blkback.ko || exit 93
xl create /tmp/work/guest.cfg > /tmp/work/xl-create.log 2>&1 || { echo "RIG: xl create failed"; cat /tmp/work/xl-create.log; rig_diag; exit 94; }
wait_for "the guest's end" 150 sh -c '! xl list guest' || { rig_diag; xl destroy guest; exit 95; }
echo "RIG: guest gone"
`);
  const run = await bootXen(work, 420_000);
  const dom0Log = readFileSync(join(work, 'dom0.log'), 'utf8');
  const guestLog = readFileSync(join(work, 'console', 'guest-guest.log'), 'latin1');
  process.stderr.write(`real Xen rig: dom0 up ${run.dom0UpSeconds?.toFixed(1)} s, scenario done ${run.seconds.toFixed(1)} s after QEMU started\n`);
  assert.equal(run.exitCode, 0, `dom0's scenario failed:\n${dom0Log}`);
  checkGuestIo(results(guestLog), join(work, 'disk.img'), imageSha);
  // Kept when a check fails: serial.log, dom0.log and console/ say what happened.
  rmSync(work, { recursive: true, force: true });
});
