/**
 * Devices that come back: `ublk add ... --save NAME` declares a device (its add command line, in
 * $UBLK_CONFIG_DIR or /etc/ublk/devices/NAME.json), `ublk up [NAME|-a]` brings every declared
 * device up (added, or recovered if its server died and it can be) and `ublk down [NAME|-a]`
 * removes them; the systemd units in systemd/ run exactly these commands at boot and shutdown.
 *
 * A device's NAME is its stable identity: its server links /dev/disk/by-ublk-name/NAME to
 * /dev/ublkbN while it serves (the job udev's by-id links do for other disks), so an fstab line
 * or a mount never depends on the numeric id the kernel handed out.
 */
import { mkdirSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { UblkControl, UblkError } from '../ublk/control.js';
import { RunDir, type DeviceState } from './run-dir.js';
import { UsageError } from '../targets/options.js';

export const BY_NAME_DIR = '/dev/disk/by-ublk-name';

/** A saved declaration: the name and the `ublk add` arguments that make the device. */
export interface SavedDevice {
  name: string;
  args: string[];
}

export const configDir = () => process.env.UBLK_CONFIG_DIR
  || ((process.geteuid?.() ?? 0) === 0 ? '/etc/ublk/devices' : join(process.env.HOME ?? '/tmp', '.config', 'ublk', 'devices'));

/** Names are file names and link names: letters, digits, `.`, `_`, `-`, not starting with `.`. */
export function checkName(name: string): string {
  if (!/^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/.test(name)) {
    throw new UsageError(`--save: '${name}' is not a device name (letters, digits, '.', '_' and '-', at most 64, not starting with '.')`);
  }
  return name;
}

export function saveDevice(d: SavedDevice): string {
  const dir = configDir();
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const path = join(dir, `${d.name}.json`);
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(d, null, 2)}\n`, { mode: 0o644 });
  renameSync(tmp, path);
  return path;
}

export function savedDevices(): SavedDevice[] {
  let files: string[];
  try {
    files = readdirSync(configDir()).filter((f) => f.endsWith('.json')).sort();
  } catch {
    return [];
  }
  return files.map((f) => loadSaved(f.slice(0, -5)));
}

export function loadSaved(name: string): SavedDevice {
  const path = join(configDir(), `${checkName(name)}.json`);
  let d: SavedDevice;
  try {
    d = JSON.parse(readFileSync(path, 'utf8')) as SavedDevice;
  } catch (e) {
    throw new UblkError(`no saved device '${name}' (${path}: ${(e as Error).message}); \`ublk add ... --save ${name}\` declares one`);
  }
  if (d.name !== name || !Array.isArray(d.args)) throw new UblkError(`${path} is not a saved ublk device`);
  return d;
}

/** The state of the device that has saved name `name`, if one exists. */
export function deviceNamed(name: string): DeviceState | undefined {
  const runDir = new RunDir();
  for (const id of UblkControl.listIds()) {
    const st = runDir.readState(id);
    if (st?.name === name) return st;
  }
  return undefined;
}

/** Links /dev/disk/by-ublk-name/NAME to the device's disk (replacing a stale link). */
export function linkName(name: string, devId: number): void {
  mkdirSync(BY_NAME_DIR, { recursive: true });
  const link = join(BY_NAME_DIR, name);
  const tmp = `${link}.${process.pid}.tmp`;
  rmSync(tmp, { force: true });
  symlinkSync(`../../ublkb${devId}`, tmp);
  renameSync(tmp, link);
}

/** Removes the name's link, if it still points at device `devId`. */
export function unlinkName(name: string, devId: number): void {
  const link = join(BY_NAME_DIR, name);
  try {
    if (readlinkSync(link) === `../../ublkb${devId}`) rmSync(link, { force: true });
  } catch { /* no link */ }
}
