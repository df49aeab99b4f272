import t from 'tap';
import { dataPathOf, dataPathProblem } from '../../src/ublk/modes.js';
import { DATA_PATH_MODES, queueDataPath } from '../../src/ublk/modes.js';
import { DataHome } from '../../src/ublk/request-data.js';
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_NEED_GET_DATA, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_UNPRIVILEGED_DEV,
  UBLK_F_USER_COPY, UBLK_F_USER_RECOVERY, UBLK_F_SHMEM_ZC,
} from '../../src/ublk/abi.js';

t.test('dataPathOf names the mode of negotiated flags, ignoring flags that are not about data', (t) => {
  t.equal(dataPathOf(0).name, 'copy');
  t.equal(dataPathOf(UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_RECOVERY).name, 'copy');
  t.equal(dataPathOf(UBLK_F_NEED_GET_DATA | UBLK_F_CMD_IOCTL_ENCODE).name, 'get_data');
  t.equal(dataPathOf(UBLK_F_USER_COPY).name, 'user_copy');
  // The zero-copy modes come with USER_COPY (modes.ts), and are named by the most copy-free flag.
  t.equal(dataPathOf(UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY).name, 'zero_copy');
  t.equal(dataPathOf(UBLK_F_SUPPORT_ZERO_COPY).name, 'zero_copy');
  t.equal(dataPathOf(UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY).name, 'auto_zc');
  t.equal(dataPathOf(UBLK_F_AUTO_BUF_REG | UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY).name, 'auto_zc');
  // Batch I/O is how requests travel, not where data is: the data path is named without it.
  t.equal(dataPathOf(UBLK_F_BATCH_IO).name, 'copy');
  t.equal(dataPathOf(UBLK_F_BATCH_IO | UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY).name, 'auto_zc');
  // Shared-memory zero copy applies request by request: the device's data path is the rest.
  t.equal(dataPathOf(UBLK_F_SHMEM_ZC).name, 'copy');
  t.equal(dataPathOf(UBLK_F_SHMEM_ZC | UBLK_F_USER_COPY).name, 'user_copy');
  t.end();
});

t.test('queueDataPath tells the queue where the data is and who registers buffers', (t) => {
  t.same(queueDataPath(0), { dataHome: DataHome.TagBuffer });
  t.same(queueDataPath(UBLK_F_NEED_GET_DATA), { dataHome: DataHome.TagBuffer });
  t.same(queueDataPath(UBLK_F_USER_COPY), { dataHome: DataHome.UserCopy });
  const zc = DATA_PATH_MODES.find((m) => m.name === 'zero_copy')!.flags;
  const auto = DATA_PATH_MODES.find((m) => m.name === 'auto_zc')!.flags;
  t.equal(zc & UBLK_F_USER_COPY, UBLK_F_USER_COPY, '-z asks for user copy too');
  t.same(queueDataPath(zc), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'manual', memoryCopy: true });
  t.same(queueDataPath(UBLK_F_SUPPORT_ZERO_COPY), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'manual', memoryCopy: false },
    'a device without user copy (another server\'s): memory copies are refused, not tried');
  t.same(queueDataPath(auto), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'auto', memoryCopy: true });
  t.same(queueDataPath(auto, true), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'auto', memoryCopy: true },
    'no fallback registration without zero copy: REGISTER_IO_BUF needs it');
  t.same(queueDataPath(auto | zc, true), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'auto-fallback', memoryCopy: true });
  t.same(queueDataPath(UBLK_F_BATCH_IO), { dataHome: DataHome.TagBuffer, batch: true }, 'batch I/O goes with the data path');
  t.same(queueDataPath(UBLK_F_BATCH_IO | auto), { dataHome: DataHome.FixedBuffer, bufferRegistration: 'auto', memoryCopy: true, batch: true });
  t.end();
});

t.test('every mode has a distinct flag and kublk option, and one line for list -v', (t) => {
  t.equal(new Set(DATA_PATH_MODES.map((m) => m.flag)).size, DATA_PATH_MODES.length);
  t.equal(new Set(DATA_PATH_MODES.map((m) => m.option)).size, DATA_PATH_MODES.length);
  for (const m of DATA_PATH_MODES) t.notMatch(m.describe, /\n/, m.name);
  t.end();
});

t.test('dataPathProblem refuses what the kernel would not grant as asked', (t) => {
  t.equal(dataPathProblem(0), undefined);
  t.equal(dataPathProblem(UBLK_F_USER_COPY), undefined);
  t.equal(dataPathProblem(UBLK_F_NEED_GET_DATA | UBLK_F_UNPRIVILEGED_DEV), undefined);
  t.match(dataPathProblem(UBLK_F_NEED_GET_DATA | UBLK_F_USER_COPY), /-g \(get_data\) and -u \(user_copy\) exclude each other/);
  t.match(dataPathProblem(UBLK_F_USER_COPY | UBLK_F_UNPRIVILEGED_DEV), /--unprivileged/);
  t.match(dataPathProblem(UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY | UBLK_F_UNPRIVILEGED_DEV), /-z \(zero_copy\) cannot be used with --unprivileged/);
  t.equal(dataPathProblem(UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG), undefined, '--auto_zc_fallback: both, as kublk asks');
  t.match(dataPathProblem(UBLK_F_BATCH_IO | UBLK_F_NEED_GET_DATA), /-g \(get_data\) and -b \(batch I\/O\) exclude each other/);
  t.equal(dataPathProblem(UBLK_F_BATCH_IO | UBLK_F_USER_COPY), undefined, 'batch I/O with a copy-free mode');
  t.end();
});
