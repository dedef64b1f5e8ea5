/**
 * NBD URIs, as qemu, libnbd and nbdkit write them
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md), for a client to find its
 * server: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
 * `nbd+unix:///EXPORT?socket=PATH` (a Unix socket). The export name is the path without its
 * leading slash, percent-decoded. `nbds://` and `nbds+unix://` require TLS, configured by the
 * query as libnbd reads it: `tls-psk-file=FILE` (the PSK identity is the URI's user, else
 * `tls-username=`, else the login name), `tls-certificates=DIR`, `tls-verify-peer=false`,
 * `tls-hostname=NAME`. vsock is not supported.
 */
import { defaultTlsUsername, type NbdClientTls } from './tls.js';


/** The port an NBD server listens on unless told otherwise. */
export const NBD_DEFAULT_PORT = 10809;

/** Where an NBD server is, and which of its exports to use. */
export type NbdTarget = (
  | { readonly transport: 'tcp'; readonly host: string; readonly port: number; readonly exportName: string }
  | { readonly transport: 'unix'; readonly path: string; readonly exportName: string }
) & {
  /** Present for nbds:// and nbds+unix://: the connection must go through NBD_OPT_STARTTLS. */
  readonly tls?: NbdClientTls;
};

/** A URI that does not name an NBD server this module can reach. */
export class NbdUriError extends Error {
  override name = 'NbdUriError';
}

/** Parses an NBD URI (WHATWG URL rules); throws NbdUriError for anything else. */
export function parseNbdUri(uri: string): NbdTarget {
  // libnbd writes a Unix socket's PSK user as nbds+unix://USER@/...: a user without a host,
  // which WHATWG URLs do not allow; take it out before parsing.
  let unixUser: string | undefined;
  const m = /^(nbds?\+unix:\/\/)([^/?#@]+)@(?=[/?]|$)(.*)$/i.exec(uri);
  if (m !== null) unixUser = m[2];
  let url: URL;
  try {
    url = new URL(m !== null ? `${m[1]}${m[3]}` : uri);
  } catch {
    throw new NbdUriError(`"${uri}" is not a URI`);
  }
  const scheme = url.protocol.slice(0, -1);
  if (!['nbd', 'nbd+unix', 'nbds', 'nbds+unix'].includes(scheme)) {
    throw new NbdUriError(`${uri}: not an NBD URI (use nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH)`);
  }
  const secure = scheme.startsWith('nbds');
  if (url.password !== '') throw new NbdUriError(`${uri}: NBD URIs carry no password (a pre-shared key goes in a file: ?tls-psk-file=FILE)`);
  const username = unixUser ?? url.username;
  if (username !== '' && !secure) throw new NbdUriError(`${uri}: a user names a TLS PSK identity; use nbds://`);
  const q = url.searchParams;
  let tls: NbdClientTls | undefined;
  if (secure) {
    let user: string;
    try {
      user = username !== '' ? decodeURIComponent(username) : q.get('tls-username') ?? defaultTlsUsername();
    } catch {
      throw new NbdUriError(`${uri}: the user is not valid percent-encoding`);
    }
    const verify = q.get('tls-verify-peer');
    if (verify !== null && verify !== 'true' && verify !== 'false') throw new NbdUriError(`${uri}: tls-verify-peer is true or false`);
    const pskFile = q.get('tls-psk-file');
    const certificates = q.get('tls-certificates');
    const hostname = q.get('tls-hostname');
    tls = {
      username: user,
      verifyPeer: verify !== 'false',
      ...(pskFile !== null && pskFile !== '' ? { pskFile } : {}),
      ...(certificates !== null && certificates !== '' ? { certificates } : {}),
      ...(hostname !== null && hostname !== '' ? { hostname } : {}),
    };
  }
  const withTls = <T extends object>(t: T): T & { tls?: NbdClientTls } => (tls !== undefined ? { ...t, tls } : t);
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    throw new NbdUriError(`${uri}: the export name is not valid percent-encoding`);
  }
  if (scheme.endsWith('+unix')) {
    if (url.hostname !== '') throw new NbdUriError(`${uri}: ${scheme}:// takes no host (write ${scheme}:///EXPORT?socket=PATH)`);
    const path = q.get('socket');
    if (path === null || path === '') throw new NbdUriError(`${uri}: ${scheme}:// needs ?socket=PATH`);
    return withTls({ transport: 'unix' as const, path, exportName });
  }
  // A bracketed IPv6 literal comes back with its brackets; net.connect wants the bare address.
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  if (host === '') throw new NbdUriError(`${uri}: ${scheme}:// needs a host`);
  const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new NbdUriError(`${uri}: port ${url.port} is not a TCP port`);
  return withTls({ transport: 'tcp' as const, host, port, exportName });
}

/** The canonical URI of a target (what logs and error messages name; TLS files left out). */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeURIComponent(t.exportName);
  const s = t.tls !== undefined ? 's' : '';
  const user = t.tls?.pskFile !== undefined ? `${encodeURIComponent(t.tls.username)}@` : '';
  if (t.transport === 'unix') return `nbd${s}+unix://${user}/${name}?socket=${encodeURIComponent(t.path)}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `nbd${s}://${user}${host}:${t.port}/${name}`;
}
