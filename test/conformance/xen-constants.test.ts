/**
 * Our constants against Xen's genuine public headers (libxen-dev), value for value, on both ABIs:
 * a C program generated from the names we export is built with gcc -m64 and -m32 (the latter run
 * under qemu-i386 where the kernel cannot run i386 binaries, as the layout conformance does) and
 * prints what the headers say. Covered: the hypervisor's GTF_*, GNTTAB*_*, GNTMAP_*, GNTCOPY_*,
 * GNTST_*, EVTCHNOP_*, EVTCHNSTAT_*, DOMID_* (xen.h, grant_table.h, event_channel.h); blkif.h's
 * BLKIF_* and VDISK_*; xenbus.h's XenbusState*; xs_wire.h's XS_*, XENSTORE_*, XSD_* and its
 * xsd_errors table; and the sizes and offsets we derive from those headers' structs.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as abi from '../../src/abi/index.js';
import * as xen from '../../src/xen/constants.js';
import * as xenbus from '../../src/xenbus/state.js';
import * as wire from '../../src/xenstore/wire.js';
import { buildConformance, type CBuild } from '../support/c-build.js';
import { tempDir } from '../support/common.js';
import { needTools } from '../support/tools.js';

needTools('/usr/include/xen/grant_table.h', '/usr/include/xen/io/xs_wire.h', '/usr/include/xen/io/blkif.h', 'gcc', 'gcc-m32', 'qemu-i386');

const ABIS = ['x86_64-abi', 'x86_32-abi'] as const;

/** Which of a module's exports come from the headers, by the names Xen gives them. */
const SOURCES: { module: Record<string, unknown>; names: RegExp }[] = [
  { module: xen, names: /^(GTF_|GNTTAB_|GNTTABOP_|GNTMAP_|GNTCOPY_|GNTST_|EVTCHNOP_|EVTCHNSTAT_|DOMID_)/ },
  // abi's XS_* are xenstore key names (strings of ours, from blkif.h's prose), not header macros.
  { module: abi, names: /^(BLKIF_|VDISK_)/ },
  { module: xenbus, names: /^XenbusState/ },
  { module: wire, names: /^(XS_|XENSTORE_|XSD_)/ },
];

/**
 * Ours that the headers do not define as such, with the C expression they are derived from (a
 * struct's size or a field's offset, or arithmetic on header macros).
 */
const DERIVED: Record<string, string> = {
  BLKIF_SEGMENT_SIZE: 'sizeof(struct blkif_request_segment)',
  BLKIF_SEGS_PER_INDIRECT_FRAME: '4096 / sizeof(struct blkif_request_segment)',
  BLKIF_MAX_INDIRECT_SEGMENTS: 'BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * (4096 / sizeof(struct blkif_request_segment))',
  XSD_SOCKMSG_SIZE: 'sizeof(struct xsd_sockmsg)',
  XSD_SOCKMSG_TYPE_OFFSET: 'offsetof(struct xsd_sockmsg, type)',
  XSD_SOCKMSG_REQ_ID_OFFSET: 'offsetof(struct xsd_sockmsg, req_id)',
  XSD_SOCKMSG_TX_ID_OFFSET: 'offsetof(struct xsd_sockmsg, tx_id)',
  XSD_SOCKMSG_LEN_OFFSET: 'offsetof(struct xsd_sockmsg, len)',
  XENSTORE_DOMAIN_INTERFACE_SIZE: 'sizeof(struct xenstore_domain_interface)',
  XENSTORE_REQ_OFFSET: 'offsetof(struct xenstore_domain_interface, req)',
  XENSTORE_RSP_OFFSET: 'offsetof(struct xenstore_domain_interface, rsp)',
  XENSTORE_REQ_CONS_OFFSET: 'offsetof(struct xenstore_domain_interface, req_cons)',
  XENSTORE_REQ_PROD_OFFSET: 'offsetof(struct xenstore_domain_interface, req_prod)',
  XENSTORE_RSP_CONS_OFFSET: 'offsetof(struct xenstore_domain_interface, rsp_cons)',
  XENSTORE_RSP_PROD_OFFSET: 'offsetof(struct xenstore_domain_interface, rsp_prod)',
  XENSTORE_SERVER_FEATURES_OFFSET: 'offsetof(struct xenstore_domain_interface, server_features)',
  XENSTORE_CONNECTION_OFFSET: 'offsetof(struct xenstore_domain_interface, connection)',
  XENSTORE_ERROR_OFFSET: 'offsetof(struct xenstore_domain_interface, error)',
};

/** Exports matched above that are tables or functions, checked on their own below. */
const NOT_CONSTANTS = new Set(['BLKIF_OP_NAMES', 'XS_TYPE_NAMES', 'XSD_ERRORS']);

interface Ours { name: string; value: number | string }
const ours: Ours[] = SOURCES.flatMap(({ module, names }) =>
  Object.keys(module).filter((n) => names.test(n) && !NOT_CONSTANTS.has(n)).sort().map((name) => {
    const value = module[name];
    if (typeof value !== 'number' && typeof value !== 'string') throw new Error(`${name}: a ${typeof value}, not a constant`);
    return { name, value };
  }));

/** Arguments MASK_XENSTORE_IDX is tried on. */
const IDX = [0, 1, 1023, 1024, 1025, 2047, 0xffffffff];

function program(): string {
  const expr = (name: string) => DERIVED[name] ?? name;
  return [
    '#include <errno.h>', '#include <stddef.h>', '#include <stdint.h>', '#include <stdio.h>', '#include <string.h>',
    '#include <xen/xen.h>', '#include <xen/grant_table.h>', '#include <xen/event_channel.h>',
    '#include <xen/io/blkif.h>', '#include <xen/io/xenbus.h>', '#include <xen/io/xs_wire.h>',
    'int main(int argc, char **argv) {',
    // c-build.ts probes that the binary really runs with --probe (exit 2, a usage line).
    '  if (argc > 1 && strcmp(argv[1], "--probe") == 0) { fprintf(stderr, "usage: constants\\n"); return 2; }',
    ...ours.map(({ name, value }) => typeof value === 'number'
      ? `  printf("%s %lld\\n", "${name}", (long long)(${expr(name)}));`
      : `  printf("%s %s\\n", "${name}", ${expr(name)});`),
    '  for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)',
    '    printf("xsd_errors %d %s\\n", xsd_errors[i].errnum, xsd_errors[i].errstring);',
    ...IDX.map((i) => `  printf("MASK_XENSTORE_IDX ${i} %lld\\n", (long long)MASK_XENSTORE_IDX((XENSTORE_RING_IDX)${i}u));`),
    '  return 0;', '}', '',
  ].join('\n');
}

const tmp = tempDir('blkif-xen-constants-');
let c: CBuild;
before(() => {
  const src = join(tmp.dir, 'constants.c');
  writeFileSync(src, program());
  c = buildConformance(src);
});
after(() => {
  c?.cleanup();
  tmp.cleanup();
});

test('every family of constants is found in our exports', () => {
  const names = new Set(ours.map((o) => o.name));
  assert.ok(ours.length >= 140, `found ${ours.length} constants`);
  for (const n of ['EVTCHNOP_bind_vcpu', 'GNTST_eagain', 'DOMID_SELF', 'BLKIF_OP_DISCARD', 'BLKIF_RSP_EOPNOTSUPP', 'VDISK_READONLY',
    'XenbusStateClosed', 'XenbusStateReconfigured', 'XS_DIRECTORY_PART', 'XS_WRITE_CREATE_EXCL', 'XENSTORE_PAYLOAD_MAX', 'XSD_SOCKMSG_SIZE']) {
    assert.ok(names.has(n), n);
  }
});

for (const abiName of ABIS) {
  test(`our constants are the headers', value for value (${abiName})`, () => {
    const r = c.run(abiName, []);
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trim().split('\n');
    const fromC = new Map<string, string>();
    const errors: string[] = [];
    const masks: string[] = [];
    for (const l of lines) {
      const [name, ...rest] = l.split(' ');
      if (name === 'xsd_errors') errors.push(`${rest[0]}:${rest[1]}`);
      else if (name === 'MASK_XENSTORE_IDX') masks.push(rest.join(' '));
      else fromC.set(name!, rest.join(' '));
    }
    for (const { name, value } of ours) assert.equal(String(value), fromC.get(name), name);
    // xs_wire.h's table of error names, in its order (the daemon answers with the first match).
    assert.deepEqual(wire.XSD_ERRORS.map((e) => `${e.errnum}:${e.errstring}`), errors, 'XSD_ERRORS is xs_wire.h\'s xsd_errors');
    assert.deepEqual(IDX.map((i) => `${i} ${wire.MASK_XENSTORE_IDX(i)}`), masks, 'MASK_XENSTORE_IDX');
  });
}
