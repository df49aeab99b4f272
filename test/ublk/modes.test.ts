import t from 'tap';
import { DATA_PATH_MODES, dataPathOf, dataPathProblem } from '../../src/ublk/modes.js';
import {
  UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_NEED_GET_DATA, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_COPY, UBLK_F_USER_RECOVERY,
} from '../../src/ublk/abi.js';

t.test('dataPathOf names the mode of negotiated flags, ignoring flags that are not about data', (t) => {
  t.equal(dataPathOf(0).name, 'copy');
  t.equal(dataPathOf(UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_RECOVERY).name, 'copy');
  t.equal(dataPathOf(UBLK_F_NEED_GET_DATA | UBLK_F_CMD_IOCTL_ENCODE).name, 'get_data');
  t.equal(dataPathOf(UBLK_F_USER_COPY).name, 'user_copy');
  // Another server's device in a mode we do not serve: named by its bits, not mistaken for copy.
  t.equal(dataPathOf(UBLK_F_SUPPORT_ZERO_COPY).name, 'flags 0x1');
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
  t.end();
});
