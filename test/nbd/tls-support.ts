/**
 * Keys and certificates for the TLS tests, made fresh in a temporary directory with the openssl
 * command (Debian: openssl): a CA, a server certificate for localhost / 127.0.0.1 / ::1 and a
 * client certificate, laid out as nbdkit, qemu and libnbd read them (ca-cert.pem,
 * server-cert.pem, server-key.pem, client-cert.pem, client-key.pem), and psktool-style key files.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requireTools } from '../support/tools.js';

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A CA in `dir` (ca-cert.pem, ca-key.pem). */
export function makeCa(dir: string, name: string): void {
  requireTools('openssl');
  mkdirSync(dir, { recursive: true });
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2',
    '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
}

/**
 * `role`-cert.pem and `role`-key.pem in `dir`, signed by the CA in `caDir` (whose ca-cert.pem is
 * copied to `dir` too, where it is not the same directory).
 */
export function makeCert(caDir: string, dir: string, role: 'server' | 'client', cn: string): void {
  mkdirSync(dir, { recursive: true });
  const ext = join(dir, `${role}.ext`);
  writeFileSync(ext, [
    'basicConstraints=critical,CA:FALSE',
    // qemu checks both key usages on RSA certificates, and the purpose.
    'keyUsage=critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}`,
    ...(role === 'server' ? ['subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1'] : []),
  ].join('\n') + '\n');
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${role}-key.pem`, '-out', `${role}.csr`, '-subj', `/CN=${cn}`], dir);
  openssl(['x509', '-req', '-in', `${role}.csr`, '-CA', join(caDir, 'ca-cert.pem'), '-CAkey', join(caDir, 'ca-key.pem'),
    '-CAcreateserial', '-out', `${role}-cert.pem`, '-days', '2', '-extfile', ext], dir);
  if (caDir !== dir) execFileSync('cp', [join(caDir, 'ca-cert.pem'), join(dir, 'ca-cert.pem')]);
}

/** A fresh 32-byte key as psktool writes it. */
export function pskLine(user: string): string {
  return `${user}:${randomBytes(32).toString('hex')}`;
}

/** Writes `keys.psk` (the name qemu's tls-creds-psk looks for) in `dir`; returns its path. */
export function writePskFile(dir: string, lines: string[]): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, 'keys.psk');
  writeFileSync(path, lines.join('\n') + '\n', { mode: 0o600 });
  return path;
}
