// Node permissions: one letter and a domid per entry; the first entry names
// the owner and gives the default for domains not listed (docs/misc/xenstore.txt,
// "Permissions").

export type PermLetter = 'n' | 'r' | 'w' | 'b';

export interface XsPermission {
  domid: number;
  perm: PermLetter;
}

export const PERM_READ = 1;
export const PERM_WRITE = 2;
export const PERM_OWNER = 4; // internal only: may change permissions

const LETTER_BITS: Record<PermLetter, number> = { n: 0, r: PERM_READ, w: PERM_WRITE, b: PERM_READ | PERM_WRITE };

export function formatPermission(p: XsPermission): string {
  return `${p.perm}${p.domid}`;
}

/** Parses e.g. "r5"; undefined when malformed (xenstored answers EINVAL). */
export function parsePermission(s: string): XsPermission | undefined {
  const m = /^([nrwb])(\d{1,5})$/.exec(s);
  if (!m) return undefined;
  const domid = Number(m[2]);
  if (domid > 0xffff) return undefined;
  return { perm: m[1] as PermLetter, domid };
}

export interface AccessSubject {
  domid: number;
  privileged: boolean;
  /** XS_SET_TARGET: a device model acts for its target domain. */
  target?: number | undefined;
}

function matches(s: AccessSubject, domid: number): boolean {
  return s.domid === domid || (s.target !== undefined && s.target === domid);
}

/** What a subject may do with a node (xenstored perm_for_conn()). */
export function permBitsFor(s: AccessSubject, perms: readonly XsPermission[]): number {
  const all = PERM_READ | PERM_WRITE | PERM_OWNER;
  const owner = perms[0];
  if (s.privileged || owner === undefined || matches(s, owner.domid)) return all;
  for (let i = 1; i < perms.length; i++) {
    const p = perms[i]!;
    if (matches(s, p.domid)) return LETTER_BITS[p.perm];
  }
  return LETTER_BITS[owner.perm];
}
