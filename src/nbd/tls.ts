/**
 * TLS for both ends of NBD (NBD_OPT_STARTTLS), configured the way nbdkit, qemu-nbd and libnbd
 * configure it, so the same files serve all of them:
 * - X.509: a directory holding `ca-cert.pem`, and `server-cert.pem` + `server-key.pem` for a
 *   server or `client-cert.pem` + `client-key.pem` for a client (qemu's tls-creds-x509 `dir`,
 *   nbdkit's `--tls-certificates`, libnbd's `tls-certificates`); `ca-crl.pem` is honoured when
 *   present;
 * - pre-shared keys: a file of `username:hexkey` lines, as GnuTLS's psktool writes it (qemu's
 *   tls-creds-psk `dir/keys.psk`, nbdkit's `--tls-psk`, libnbd's `tls-psk-file`).
 *
 * Interoperability, checked against GnuTLS 3.7 (libnbd 1.14, qemu 7.2, nbdkit 1.32): those
 * clients and servers offer TLS 1.3 first, with external PSKs whose binder hash is SHA-256;
 * OpenSSL's PSK callbacks (which Node's `pskCallback` uses) assume SHA-256 for TLS 1.3 too, so
 * TLS 1.3 PSK works as is (the cipher chosen is then a SHA-256 one, e.g.
 * TLS_CHACHA20_POLY1305_SHA256). For a peer limited to TLS 1.2 the PSK cipher suites must be
 * named explicitly: Node's default cipher list ends with `!PSK`, which removes them for good.
 * The server orders the suites itself, AES-GCM first on a CPU with AES instructions
 * (`serverCiphers`).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { userInfo } from 'node:os';
import { checkServerIdentity, createSecureContext, type ConnectionOptions, type SecureContextOptions, type TlsOptions } from 'node:tls';

/** `--tls`: never, allowed (clients choose), or required before any export is shown. */
export type NbdTlsMode = 'off' | 'on' | 'require';

/**
 * TLS 1.2 suites for pre-shared keys, strongest first (ephemeral ECDH with the PSK before plain
 * PSK; AEAD only). TLS 1.3 suites are OpenSSL's defaults.
 */
export const PSK_TLS12_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305', 'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-CHACHA20-POLY1305', 'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384', 'PSK-CHACHA20-POLY1305', 'PSK-AES128-GCM-SHA256',
].join(':');

/**
 * Whether the CPU has AES instructions (x86's AES-NI, ARMv8's AES; the `aes` flag of
 * /proc/cpuinfo): then AES-GCM is several times faster than ChaCha20-Poly1305, which is the
 * better choice only without them. Unknown (no /proc) counts as without.
 */
export function cpuHasAes(cpuinfo: () => string = () => readFileSync('/proc/cpuinfo', 'utf8')): boolean {
  try {
    return /^(flags|Features)\s*:.*\baes\b/m.test(cpuinfo());
  } catch {
    return false;
  }
}

/**
 * The server's cipher order, which it then imposes (honorCipherOrder): with AES instructions,
 * AES-GCM first in TLS 1.3 and 1.2, else ChaCha20-Poly1305 first. Without this, OpenSSL's and
 * GnuTLS's default orders agree on TLS_CHACHA20_POLY1305_SHA256 for a SHA-256 PSK (AES-256-GCM
 * goes with SHA-384), however fast AES is on the machine. `psk`: the TLS 1.2 suites are the PSK
 * ones; else ECDHE with certificates.
 */
export function serverCiphers(aes: boolean, psk: boolean): string {
  const gcm13 = ['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384'];
  const chacha13 = ['TLS_CHACHA20_POLY1305_SHA256'];
  const tls13 = aes ? [...gcm13, ...chacha13] : [...chacha13, ...gcm13];
  const tls12 = (psk ? PSK_TLS12_CIPHERS : CERT_TLS12_CIPHERS).split(':');
  const chachaFirst = [...tls12].sort((a, b) => Number(b.includes('CHACHA')) - Number(a.includes('CHACHA')));
  const gcmFirst = [...tls12].sort((a, b) => Number(b.includes('GCM')) - Number(a.includes('GCM')));
  return [...tls13, ...(aes ? gcmFirst : chachaFirst)].join(':');
}

/** TLS 1.2 suites for certificates: ephemeral ECDH, AEAD only. */
const CERT_TLS12_CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDHE-RSA-AES128-GCM-SHA256', 'ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305', 'ECDHE-RSA-CHACHA20-POLY1305',
].join(':');

/** A bad key file or certificate directory: the message names the file and what is wrong. */
export class NbdTlsConfigError extends Error {
  override name = 'NbdTlsConfigError';
}

/** Pre-shared keys by username. */
export type PskKeys = ReadonlyMap<string, Buffer>;

/**
 * Parses a psktool key file: one `username:hexkey` per line; blank lines ignored. Throws
 * NbdTlsConfigError (naming `where` and the line) for anything else, and for a file with no key.
 */
export function parsePskFile(text: string, where = 'PSK file'): PskKeys {
  const keys = new Map<string, Buffer>();
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') continue;
    const colon = line.lastIndexOf(':');
    if (colon <= 0) throw new NbdTlsConfigError(`${where}:${i + 1}: expected username:hexkey`);
    const user = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new NbdTlsConfigError(`${where}:${i + 1}: the key of "${user}" is not an even number of hex digits`);
    if (keys.has(user)) throw new NbdTlsConfigError(`${where}:${i + 1}: "${user}" appears twice`);
    keys.set(user, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new NbdTlsConfigError(`${where}: no username:hexkey line`);
  return keys;
}

function readText(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new NbdTlsConfigError(`cannot read ${what} ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

function readOptional(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new NbdTlsConfigError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

export function readPskFile(path: string): PskKeys {
  return parsePskFile(readText(path, 'PSK file'), path);
}

/** What a server needs for TLS. Plain data (strings and buffers), so it crosses into a worker. */
export type NbdServerTls =
  | { readonly kind: 'psk'; readonly keys: PskKeys }
  | { readonly kind: 'x509'; readonly ca: string; readonly cert: string; readonly key: string; readonly crl?: string; readonly verifyPeer: boolean };

export interface NbdServerTlsConfig {
  readonly mode: NbdTlsMode;
  readonly credentials: NbdServerTls;
  /** Put AES-GCM before ChaCha20-Poly1305 (default: where the CPU has AES instructions, `cpuHasAes`). */
  readonly aesFirst?: boolean;
}

/**
 * Loads a server's credentials: `psk` (a key file) wins over `certificates` (a directory), as in
 * nbdkit. `verifyPeer` asks X.509 clients for a certificate signed by the directory's CA.
 */
export function loadServerTls(o: { psk?: string; certificates?: string; verifyPeer?: boolean }): NbdServerTls {
  if (o.psk !== undefined) return { kind: 'psk', keys: readPskFile(o.psk) };
  if (o.certificates === undefined) throw new NbdTlsConfigError('TLS needs --tls-psk=FILE or --tls-certificates=DIR');
  const dir = o.certificates;
  const crl = readOptional(join(dir, 'ca-crl.pem'));
  return {
    kind: 'x509',
    ca: readText(join(dir, 'ca-cert.pem'), 'CA certificate'),
    cert: readText(join(dir, 'server-cert.pem'), 'server certificate'),
    key: readText(join(dir, 'server-key.pem'), 'server key'),
    ...(crl !== undefined ? { crl } : {}),
    verifyPeer: o.verifyPeer === true,
  };
}

/**
 * Options for `new TLSSocket(socket, { isServer: true, ... })` from the credentials: one secure
 * context (keys parsed once) shared by every connection.
 */
export function serverTlsOptions(c: NbdServerTls, aes = cpuHasAes()): TlsOptions {
  const ciphers = serverCiphers(aes, c.kind === 'psk');
  if (c.kind === 'psk') {
    return {
      secureContext: createSecureContext({ ciphers, honorCipherOrder: true, minVersion: 'TLSv1.2' }),
      // Returning nothing for an unknown identity fails the handshake: there is no certificate
      // to fall back on.
      pskCallback: (_socket, identity) => c.keys.get(identity) ?? null,
    };
  }
  const ctx: SecureContextOptions = { ca: c.ca, cert: c.cert, key: c.key, ciphers, honorCipherOrder: true, minVersion: 'TLSv1.2', ...(c.crl !== undefined ? { crl: c.crl } : {}) };
  return { secureContext: createSecureContext(ctx), requestCert: c.verifyPeer, rejectUnauthorized: c.verifyPeer };
}

/** The TLS part of an `nbds://` or `nbds+unix://` URI, as libnbd reads its query. */
export interface NbdClientTls {
  /** PSK identity (`nbds://USER@...`, else `tls-username=`, else the login name). */
  readonly username: string;
  /** `tls-psk-file=FILE`: use that key instead of certificates. */
  readonly pskFile?: string;
  /** `tls-certificates=DIR`: ca-cert.pem (+ client-cert.pem/client-key.pem); default: the system's CAs. */
  readonly certificates?: string;
  /** `tls-verify-peer=false` skips checking the server's certificate (default true). */
  readonly verifyPeer: boolean;
  /** `tls-hostname=NAME`: the name the certificate must carry (default: the URI's host). */
  readonly hostname?: string;
}

export function defaultTlsUsername(): string {
  try {
    return userInfo().username;
  } catch {
    return process.env.USER ?? 'nbd';
  }
}

/** Options for `tls.connect({ socket, ... })`; `host` is the TCP host, if any (for the certificate check). */
export function clientTlsOptions(t: NbdClientTls, host: string | undefined): ConnectionOptions {
  if (t.pskFile !== undefined) {
    const keys = readPskFile(t.pskFile);
    const key = keys.get(t.username);
    if (key === undefined) throw new NbdTlsConfigError(`${t.pskFile}: no key for username "${t.username}"`);
    return {
      ciphers: PSK_TLS12_CIPHERS,
      minVersion: 'TLSv1.2',
      pskCallback: () => ({ psk: key, identity: t.username }),
      // With a PSK there is no certificate: the key proves the server.
      checkServerIdentity: () => undefined,
    };
  }
  const o: ConnectionOptions = { minVersion: 'TLSv1.2', rejectUnauthorized: t.verifyPeer };
  if (t.certificates !== undefined) {
    const dir = t.certificates;
    o.ca = readText(join(dir, 'ca-cert.pem'), 'CA certificate');
    const cert = readOptional(join(dir, 'client-cert.pem'));
    const key = readOptional(join(dir, 'client-key.pem'));
    if ((cert === undefined) !== (key === undefined)) throw new NbdTlsConfigError(`${dir}: client-cert.pem and client-key.pem go together`);
    if (cert !== undefined) {
      o.cert = cert;
      o.key = key;
    }
    const crl = readOptional(join(dir, 'ca-crl.pem'));
    if (crl !== undefined) o.crl = crl;
  }
  const name = t.hostname ?? host;
  if (name !== undefined && !/^[\d.]+$|:/.test(name)) o.servername = name;
  if (name !== undefined) {
    o.checkServerIdentity = (_servername, cert) => checkServerIdentity(name, cert);
  } else {
    // A Unix socket without tls-hostname: the chain is checked, not a name.
    o.checkServerIdentity = () => undefined;
  }
  return o;
}
