/**
 * The real-Xen rig: Debian's Xen 4.17 and Debian 12's own 6.1 kernel booted under
 * qemu-system-x86_64 with TCG (no KVM here), as issue 22 measured it.
 *
 * - Xen (`/boot/xen-4.17-amd64.gz`, gunzipped: an ELF32 multiboot image) is QEMU's `-kernel`; the
 *   dom0 kernel and a busybox initramfs are its multiboot modules (`-initrd "vmlinuz args,initrd"`).
 * - dom0's init loads the Xen and 9p modules, mounts this machine's / read-only over 9p, binds
 *   /proc, /sys, /dev into it, mounts xenfs and tmpfs where Xen's tools write, and runs the test's
 *   scenario (`dom0.sh` in the work directory) in a chroot there: Debian's xenstored, xl, and
 *   this checkout's own dist/ are all visible as they are on this machine.
 * - The work directory is a second, writable 9p share, `/tmp/work` inside the chroot: images,
 *   the guest's config and ramdisk, and every log land there for the test to read.
 * - A guest (domU) started by `xl create` runs the same kernel with a busybox initramfs holding
 *   xen-blkfront.ko; its scenario is a second cpio appended to the cached base (the kernel
 *   unpacks concatenated archives one after the other).
 *
 * The initramfs images are built at test time from the installed packages and cached under the
 * system's temporary directory, keyed by what went into them. A missing piece fails with one
 * line naming the Debian package (test/setup/debian-packages.txt).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { track } from '../support/children.js';
import { MissingTool, requireTools } from '../support/tools.js';
import { cpioNewc, type CpioEntry } from './cpio.js';

/** Xen and kernel bits the rig boots, found where Debian's packages put them. */
export interface RigInputs {
  readonly xenGz: string;
  readonly vmlinuz: string;
  readonly kver: string;
  readonly modules: string;
  readonly busybox: string;
}

const XEN_GZ = '/boot/xen-4.17-amd64.gz';
const BUSYBOX = '/bin/busybox';

/** What every rig needs on this machine (test/setup/debian-packages.txt names their packages). */
export const RIG_TOOLS = [
  XEN_GZ, '/usr/share/doc/linux-image-amd64', '/usr/sbin/xl', '/usr/lib/xen-4.17/bin/xenstored', 'qemu-system-x86_64',
  '/usr/share/doc/busybox-static', '/usr/lib/x86_64-linux-gnu/libxengnttab.so.1', '/usr/lib/x86_64-linux-gnu/libxenevtchn.so.1',
];

/** The installed pieces, or a one-line MissingTool naming the package. */
export function rigInputs(): RigInputs {
  requireTools(...RIG_TOOLS);
  const kernels = readdirSync('/boot').filter((f) => /^vmlinuz-6\.1\..*-amd64$/.test(f)).sort();
  const vmlinuz = kernels.at(-1);
  if (vmlinuz === undefined) requireTools('/boot/vmlinuz-6.1-amd64');
  const kver = vmlinuz!.slice('vmlinuz-'.length);
  const modules = `/lib/modules/${kver}`;
  if (!existsSync(`${modules}/modules.dep`)) throw new MissingTool(`${modules}/modules.dep missing: reinstall Debian package linux-image-${kver}`);
  return { xenGz: XEN_GZ, vmlinuz: `/boot/${vmlinuz}`, kver, modules, busybox: BUSYBOX };
}

/** Modules dom0 loads, in order, with what modules.dep says each needs before it. */
const DOM0_MODULES = ['xen-privcmd', 'xenfs', 'xen-evtchn', 'xen-gntdev', 'xen-gntalloc', 'loop', 'virtio_pci', '9pnet_virtio', '9p'];
/** Loaded by a scenario when it wants Linux's backend (ours needs it absent). */
const DOM0_OPTIONAL = ['xen-blkback'];
const DOMU_MODULES = ['xen-blkfront'];

/** `names` and everything they depend on, dependencies first, as paths under the modules dir. */
function withDeps(modulesDir: string, names: readonly string[]): string[] {
  const dep = new Map<string, string[]>();
  const byName = new Map<string, string>();
  for (const line of readFileSync(`${modulesDir}/modules.dep`, 'utf8').split('\n')) {
    const [mod, rest] = line.split(':');
    if (mod === undefined || rest === undefined) continue;
    dep.set(mod, rest.trim() === '' ? [] : rest.trim().split(/\s+/));
    byName.set(mod.replace(/^.*\//, '').replace(/\.ko(\..*)?$/, '').replace(/-/g, '_'), mod);
  }
  const out: string[] = [];
  const visit = (mod: string) => {
    if (out.includes(mod)) return;
    // modules.dep lists a module's dependencies, the deepest last: load them deepest first.
    for (const d of [...(dep.get(mod) ?? [])].reverse()) visit(d);
    out.push(mod);
  };
  for (const n of names) {
    const mod = byName.get(n.replace(/-/g, '_'));
    if (mod === undefined) throw new MissingTool(`kernel module ${n} not found in ${modulesDir}: reinstall Debian package linux-image-amd64`);
    visit(mod);
  }
  return out;
}

const DOM0_INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# devtmpfs has no pts: xenconsoled needs ptys for the guests' consoles.
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
for m in $(cat /modules.load); do insmod /$m || echo "BLKIF-RIG: insmod $m failed"; done
mkdir -p /host
# cache=loose: this machine's files do not change during a boot, and dom0 keeps what it read
# (node and its modules are read once, not once per start, at TCG's cost per 9p round trip).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /host || echo "BLKIF-RIG: 9p host mount failed"
mount -o bind /proc /host/proc; mount -o bind /sys /host/sys; mount -o rbind /dev /host/dev
mount -t xenfs xenfs /host/proc/xen
for d in run tmp var/lib/xen var/log; do mount -t tmpfs tmpfs /host/$d; done
mkdir -p /host/tmp/work /host/run/lock
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 work /host/tmp/work || echo "BLKIF-RIG: 9p work mount failed"
cp -r /rig-modules /host/run/rig-modules
echo BLKIF-RIG-DOM0-UP
chroot /host /bin/sh /tmp/work/dom0.sh > /host/tmp/work/dom0.log 2>&1
echo "BLKIF-RIG-EXIT $?"
sync
poweroff -f
`;

const DOMU_INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo BLKIF-DOMU-UP
sh /scenario.sh
echo "BLKIF-DOMU-EXIT $?"
sync
poweroff -f
`;

/** The rig's boot images: gunzipped Xen, and the two base initramfs archives. */
export interface RigImages {
  readonly inputs: RigInputs;
  readonly xen: string;
  readonly dom0Initrd: string;
  readonly domuInitrd: string;
}

function stamp(path: string): string {
  const s = statSync(path);
  return `${path}:${s.size}:${s.mtimeMs}`;
}

function busyboxTree(busybox: string, init: string, modulesDir: string, modules: readonly string[], into: string): CpioEntry[] {
  const dirs = ['bin', 'dev', 'proc', 'sys', 'tmp', 'mnt'];
  // Each parent before its child: the kernel's unpacker creates no missing parents.
  for (let i = into.indexOf('/'); ; i = into.indexOf('/', i + 1)) {
    dirs.push(i < 0 ? into : into.slice(0, i));
    if (i < 0) break;
  }
  const entries: CpioEntry[] = dirs.map((d) => ({ path: d, kind: 'dir' }));
  entries.push({ path: 'bin/busybox', kind: 'file', data: readFileSync(busybox), mode: 0o755 });
  entries.push({ path: 'bin/sh', kind: 'symlink', target: 'busybox' });
  entries.push({ path: 'init', kind: 'file', data: Buffer.from(init), mode: 0o755 });
  for (const m of modules) entries.push({ path: `${into}/${m.replace(/^.*\//, '')}`, kind: 'file', data: readFileSync(`${modulesDir}/${m}`) });
  return entries;
}

let cached: RigImages | undefined;

/** Builds (or finds in the cache) the boot images. */
export function rigImages(): RigImages {
  if (cached !== undefined) return cached;
  const inputs = rigInputs();
  const dom0Mods = withDeps(inputs.modules, DOM0_MODULES);
  const optional = withDeps(inputs.modules, DOM0_OPTIONAL);
  const domuMods = withDeps(inputs.modules, DOMU_MODULES);
  const key = createHash('sha256')
    .update([stamp(inputs.xenGz), stamp(inputs.vmlinuz), stamp(inputs.busybox), stamp(`${inputs.modules}/modules.dep`), DOM0_INIT, DOMU_INIT,
      dom0Mods.join(','), optional.join(','), domuMods.join(','),
      // The builder itself: a change to how the images are made makes new ones.
      readFileSync(fileURLToPath(import.meta.url), 'utf8'), readFileSync(fileURLToPath(new URL('./cpio.js', import.meta.url)), 'utf8')].join('\n'))
    .digest('hex').slice(0, 16);
  const dir = join(tmpdir(), 'blkif-realxen-cache', key);
  const images: RigImages = { inputs, xen: join(dir, 'xen.elf'), dom0Initrd: join(dir, 'dom0.cpio'), domuInitrd: join(dir, 'domu.cpio') };
  if (!existsSync(images.domuInitrd)) {
    mkdirSync(dir, { recursive: true });
    const write = (path: string, data: Uint8Array) => { writeFileSync(`${path}.part`, data); renameSync(`${path}.part`, path); };
    write(images.xen, gunzipSync(readFileSync(inputs.xenGz)));
    const dom0 = busyboxTree(inputs.busybox, DOM0_INIT, inputs.modules, dom0Mods, 'lib/modules');
    dom0.push({ path: 'modules.load', kind: 'file', data: Buffer.from(dom0Mods.map((m) => `lib/modules/${m.replace(/^.*\//, '')}`).join('\n')) });
    // Modules a scenario may load itself (Linux's blkback), copied to /run/rig-modules in the chroot.
    dom0.push({ path: 'rig-modules', kind: 'dir' });
    for (const m of optional.filter((m) => !dom0Mods.includes(m))) {
      dom0.push({ path: `rig-modules/${m.replace(/^.*\//, '')}`, kind: 'file', data: readFileSync(`${inputs.modules}/${m}`) });
    }
    write(images.dom0Initrd, cpioNewc(dom0));
    write(images.domuInitrd, cpioNewc(busyboxTree(inputs.busybox, DOMU_INIT, inputs.modules, domuMods, 'modules')));
  }
  cached = images;
  return images;
}

/** A guest's ramdisk: the cached base and, appended, its scenario as /scenario.sh. */
export function writeDomuRamdisk(out: string, scenario: string): void {
  const base = readFileSync(rigImages().domuInitrd);
  writeFileSync(out, Buffer.concat([base, cpioNewc([{ path: 'scenario.sh', kind: 'file', data: Buffer.from(scenario), mode: 0o755 }])]));
}

/** Writes an executable script into the work directory. */
export function writeScript(path: string, text: string): void {
  writeFileSync(path, text);
  chmodSync(path, 0o755);
}

/**
 * The start of every dom0 scenario: Xen's daemons up, as Debian's xencommons would start them,
 * on the tmpfs the init mounted. Defines `wait_for WHAT SECONDS CMD...`: a bounded poll.
 */
/**
 * This checkout (its dist/ and node_modules/ are what dom0 runs). dom0 sees this machine's / over
 * 9p, but with tmpfs over /tmp, /run, /var/lib/xen and /var/log: a checkout under one of those (a
 * CI clone in /tmp) is shared on its own as well and mounted at the same path (DOM0_PRELUDE).
 */
export const CHECKOUT = fileURLToPath(new URL('../../../', import.meta.url)).replace(/\/$/, '');

export const DOM0_PRELUDE = `set -u
if [ ! -e '${CHECKOUT}/package.json' ]; then
  mkdir -p '${CHECKOUT}' && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose checkout '${CHECKOUT}' || { echo "RIG: 9p mount of the checkout failed"; exit 89; }
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
wait_for() { what=$1; n=$2; shift 2; i=0; while ! "$@" >/dev/null 2>&1; do i=$((i+1)); if [ $i -ge $((n*5)) ]; then echo "RIG: timed out after $n s waiting for $what"; return 1; fi; sleep 0.2; done; }
export XENSTORED_ROOTDIR=/run/xenstored-lib
mkdir -p $XENSTORED_ROOTDIR /var/log/xen/console /var/lib/xen /run/xen
/usr/lib/xen-4.17/bin/xenstored --pid-file /run/xenstored.pid
wait_for xenstored 30 test -S /run/xenstored/socket || exit 90
/usr/lib/xen-4.17/bin/xen-init-dom0 || exit 91
/usr/lib/xen-4.17/bin/xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/tmp/work/console || exit 92
echo "RIG: dom0 ready"
# On a failure, what a person would look at first.
rig_diag() { echo "RIG: diagnostics"; ps -ef; xl list; xenstore-ls -f 2>/dev/null | grep -v '^/local/domain/0/memory' | head -150; xl dmesg | tail -40; }
`;

/** How one boot went. */
export interface XenRun {
  /** The serial console: Xen's and dom0's messages. */
  readonly console: string;
  /** The dom0 scenario's exit status (undefined if it never finished). */
  readonly exitCode: number | undefined;
  /** Seconds from QEMU's start to the scenario's end. */
  readonly seconds: number;
  /** Seconds from QEMU's start to dom0's init. */
  readonly dom0UpSeconds: number | undefined;
}

/**
 * Boots Xen with `work` as the writable share; dom0 runs `work/dom0.sh` (the caller wrote it)
 * and the run ends when it exits (QEMU is then stopped), or after `timeoutMs` (QEMU killed,
 * and the error quotes the console's last lines). QEMU is also tracked: the test file's `after`
 * hook kills it whatever happened.
 */
export async function bootXen(work: string, timeoutMs: number): Promise<XenRun> {
  const img = rigImages();
  requireTools('qemu-system-x86_64');
  if (!existsSync(join(work, 'dom0.sh'))) throw new Error(`${work}/dom0.sh: the scenario is missing`);
  mkdirSync(join(work, 'console'), { recursive: true });
  const args = [
    '-machine', 'q35', '-m', '2048', '-smp', '2', '-cpu', 'qemu64,+svm',
    // One host thread for both vCPUs: the machine has two cores and other tests share them.
    '-accel', 'tcg,thread=single',
    '-nodefaults', '-display', 'none', '-no-reboot', '-serial', 'stdio', '-monitor', 'none',
    '-kernel', img.xen,
    '-append', 'console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all',
    '-initrd', `${img.inputs.vmlinuz} console=hvc0 earlyprintk=xen loglevel=5,${img.dom0Initrd}`,
    '-virtfs', 'local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${work},mount_tag=work,security_model=none,multidevs=remap`,
    '-virtfs', `local,path=${CHECKOUT},mount_tag=checkout,security_model=none,readonly=on,multidevs=remap`,
  ];
  const started = Date.now();
  const qemu: ChildProcess = track(spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  const log = createWriteStream(join(work, 'serial.log'));
  let text = '';
  let dom0Up: number | undefined;
  let exitCode: number | undefined;
  let finished: () => void = () => {};
  const done = new Promise<void>((resolve) => { finished = resolve; });
  const onData = (chunk: Buffer) => {
    log.write(chunk);
    text += chunk.toString('latin1');
    if (dom0Up === undefined && text.includes('BLKIF-RIG-DOM0-UP')) dom0Up = (Date.now() - started) / 1000;
    const m = /BLKIF-RIG-EXIT (\d+)/.exec(text);
    if (m !== null && exitCode === undefined) { exitCode = Number(m[1]); finished(); }
  };
  qemu.stdout!.on('data', onData);
  qemu.stderr!.on('data', onData);
  qemu.once('exit', () => finished());
  const timer = setTimeout(finished, timeoutMs);
  try {
    await done;
  } finally {
    clearTimeout(timer);
    if (qemu.exitCode === null && qemu.signalCode === null) {
      // dom0 powers the machine off after the scenario: give it a moment, then end QEMU.
      const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
      const kill = setTimeout(() => qemu.kill('SIGKILL'), exitCode === undefined ? 0 : 10_000);
      await exited;
      clearTimeout(kill);
    }
    await new Promise<void>((resolve) => log.end(resolve));
  }
  const seconds = (Date.now() - started) / 1000;
  if (exitCode === undefined) {
    const tail = text.split('\n').slice(-25).join('\n');
    throw new Error(`real Xen: dom0's scenario did not finish within ${timeoutMs / 1000} s (QEMU ${qemu.exitCode ?? qemu.signalCode}); serial console's end:\n${tail}`);
  }
  return { console: text, exitCode, seconds, dom0UpSeconds: dom0Up };
}

/** `RESULT key value...` lines a guest or dom0 printed, in order. */
export function results(text: string): [string, string[]][] {
  return [...text.matchAll(/^RESULT (\S+)(.*)$/gm)].map((m) => [m[1]!, m[2]!.trim().split(/\s+/).filter((s) => s !== '')]);
}

/** A work directory for one boot. */
export function workDir(name: string): string {
  const dir = join(tmpdir(), `blkif-realxen-${name}-${process.pid}`);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/**
 * A hotplug script for Linux's blkback (an xl disk line's `script=`): a loop device over the
 * image, as libxl's `block` does in short (its own times out in so bare a dom0).
 */
export const LOOP_HOTPLUG = `#!/bin/sh
# libxl runs it with add or remove, the backend's xenstore path in XENBUS_PATH.
case "$1" in
add)
  f=$(xenstore-read "$XENBUS_PATH/params") || exit 1
  loop=$(losetup -f --show "$f") || exit 1
  xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c '%t:%T' "$loop")" \\
    "$XENBUS_PATH/physical-device-path" "$loop" "$XENBUS_PATH/hotplug-status" connected ;;
remove)
  loop=$(xenstore-read "$XENBUS_PATH/physical-device-path") && losetup -d "$loop" ;;
esac
`;
