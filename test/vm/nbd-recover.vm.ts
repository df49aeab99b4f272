/**
 * The nbd target with user recovery (run inside the VM): the ublk server is killed (-9) under fio
 * write + crc32c verify and `ublk recover` serves the device again: the new server probes the
 * NBD server, opens its own connections and answers the requests the kernel kept (-i 1 reissues
 * them), and fio finishes with no error. The NBD server itself failing is nbd.vm.ts's.
 */
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { addDevice, freePort, fioJob, killServer, noDeviceLeftBehind, serverPid, sleep, ublk, waitFor, onKernel } from './helpers.js';

const CYCLES = Number(process.env.UBLK_RECOVER_CYCLES ?? 2);

t.afterEach(noDeviceLeftBehind);

t.test(`nbd with -r 1 -i 1 -q 2: fio verify across ${CYCLES} kill -9 + recover cycles of the ublk server`, onKernel('lts'), async (t) => {
  const port = await freePort();
  const nbdkit: ChildProcess = spawn('nbdkit', ['-f', '-p', String(port), '-i', '127.0.0.1', 'memory', '128M'], { stdio: 'ignore' });
  t.teardown(() => { nbdkit.kill('SIGKILL'); });
  const up = await waitFor(() => spawnSync('sh', ['-c', `cat /proc/net/tcp | grep -qi ':${port.toString(16).toUpperCase().padStart(4, '0')} 00000000:0000 0A'`]).status === 0, 10_000);
  t.ok(up, 'nbdkit listens');
  const id = addDevice('-t', 'nbd', '--host', '127.0.0.1', '--port', String(port), '-q', '2', '-r', '1', '-i', '1');
  const dev = `/dev/ublkb${id}`;
  const pids = new Set<number>([serverPid(id)]);
  for (let i = 0; i < CYCLES; i++) {
    const job = fioJob(dev, ['--rw=randwrite', '--bs=4k', '--ioengine=io_uring', '--iodepth=16', '--direct=1',
      '--size=16M', `--offset=${(i % 2) * 16}M`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${7 + i}`]);
    await sleep(500 + Math.floor(Math.random() * 2000));
    await killServer(t, id);
    const r = ublk('recover', '-n', String(id));
    t.equal(r.code, 0, `cycle ${i}: recover: ${r.stderr}`);
    pids.add(serverPid(id));
    const f = await job.done;
    t.equal(f.code, 0, `cycle ${i}: fio finished: ${f.stderr.slice(-300)}`);
    t.equal(f.error, 0, `cycle ${i}: no I/O or verify error`);
  }
  t.equal(pids.size, CYCLES + 1, 'each cycle had a new server');
  t.equal(ublk('del', '-n', String(id)).code, 0);
});
