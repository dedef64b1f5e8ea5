/**
 * The external tools the NBD sections run, by version (the report's machine section), or
 * undefined when one is not installed. The servers and clients themselves are in serve.ts.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** Version line of a tool, or undefined if it is not installed. */
export async function toolVersion(cmd: string, args: readonly string[] = ['--version']): Promise<string | undefined> {
  try {
    const { stdout, stderr } = await execFileP(cmd, [...args], { timeout: 10_000 });
    return (stdout || stderr).split('\n').find((l) => l.trim() !== '')?.trim();
  } catch {
    return undefined;
  }
}
