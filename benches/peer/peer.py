#!/usr/bin/env python3
"""qnbd's peer benchmark: `qnbd serve` against qemu-nbd and nbdkit on the same data.

qnbd and qemu-nbd serve the same qcow2 (64 KiB clusters, random data, fully allocated); nbdkit's
`file` plugin serves the raw equivalent of it (nbdkit cannot read qcow2). Every (job, server)
pair runs REPS times, interleaved (ABBA order) so that the noise of a shared machine hits every
server alike; the table reports medians, min-max and ratios against the best qemu-nbd setting
and against nbdkit. The server is restarted for every run (RSS is its peak for that run).

Jobs (the targets table of the performance issue):
  randread-4k-qd32        4k random reads, QD32, warm page cache
  randread-4k-qd1         4k random reads, QD1 (latency)
  randwrite-4k-qd32-fresh 4k random writes into a freshly created (empty) image: allocating
  randwrite-4k-qd32       4k random writes into the allocated image: in place
  seqread-1m-qd8          1 MiB sequential reads, QD8
  seqwrite-1m-qd8         1 MiB sequential writes, QD8 (allocated image)
  nbdcopy                 nbdcopy of the whole image to null:
  randread-4k-qd32-2conn  two connections (fio numjobs=2, multi-conn), QD32 each
  chain-randread-4k-qd32  4k random reads through a 3-deep chain with data in every layer
  map                     nbdinfo --map (whole-image BLOCK_STATUS) of a sparse image with many
                          allocated extents (--map-size, --map-extents)

Run it from the repository through benches/peer.sh (it builds qnbd first); see benches/README.md.
"""
import argparse, json, os, re, shlex, signal, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIO_DIR = os.path.join(HERE, 'fio')

ALL_JOBS = ['randread-4k-qd32', 'randread-4k-qd1', 'randwrite-4k-qd32-fresh', 'randwrite-4k-qd32',
            'seqread-1m-qd8', 'seqwrite-1m-qd8', 'nbdcopy', 'randread-4k-qd32-2conn',
            'chain-randread-4k-qd32', 'map']
# (fio job file, image kind) per job; image kinds: alloc, fresh, chain, map
JOB_SPEC = {
    'randread-4k-qd32': ('randread-4k-qd32', 'alloc'),
    'randread-4k-qd1': ('randread-4k-qd1', 'alloc'),
    'randwrite-4k-qd32-fresh': ('randwrite-4k-qd32', 'fresh'),
    'randwrite-4k-qd32': ('randwrite-4k-qd32', 'alloc'),
    'seqread-1m-qd8': ('seqread-1m-qd8', 'alloc'),
    'seqwrite-1m-qd8': ('seqwrite-1m-qd8', 'alloc'),
    'nbdcopy': (None, 'alloc'),
    'randread-4k-qd32-2conn': ('randread-4k-qd32-2conn', 'alloc'),
    'chain-randread-4k-qd32': ('randread-4k-qd32', 'chain'),
    'map': (None, 'map'),
}
TCP_DEFAULT_JOBS = ['randread-4k-qd32', 'randwrite-4k-qd32', 'seqread-1m-qd8']
QUICK_JOBS = ['randread-4k-qd32', 'randread-4k-qd1', 'randwrite-4k-qd32', 'seqread-1m-qd8',
              'randread-4k-qd32-2conn']

# qemu-nbd settings tried; the reference figure of a job is the best median among them.
QEMU_CONFIGS = {
    'wb-uring': '--cache=writeback --aio=io_uring',
    'wb-threads': '--cache=writeback --aio=threads',
    'none-uring': '--cache=none --aio=io_uring',
    'none-threads': '--cache=none --aio=threads',
    'none-native': '--cache=none --aio=native',
}


def die(msg):
    print('peer: ' + msg, file=sys.stderr)
    sys.exit(2)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw)


def parse_size(s):
    m = re.fullmatch(r'(\d+)([KMGT]?)', s.upper())
    if not m:
        die('bad size ' + s)
    return int(m.group(1)) * 1024 ** ' KMGT'.index(m.group(2) or ' ')


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--quick', action='store_true', help='~2 minutes: fewer jobs, one qemu-nbd setting, unix only')
ap.add_argument('-r', '--reps', type=int, default=3, help='runs per (job, server); medians reported (default 3)')
ap.add_argument('-t', '--runtime', type=int, default=2, help='fio seconds per run (default 2)')
ap.add_argument('-s', '--size', default='1G', help='virtual size of the test image (default 1G; the issue names 4G)')
ap.add_argument('-T', '--transport', default='unix,tcp', help='unix, tcp or both (default unix,tcp)')
ap.add_argument('-j', '--jobs', help='comma-separated jobs (default: all over unix, a subset over tcp)')
ap.add_argument('--tcp-jobs', help='jobs run over tcp (default: %s)' % ','.join(TCP_DEFAULT_JOBS))
ap.add_argument('-q', '--qemu', default='wb-uring,wb-threads',
                help='qemu-nbd settings: %s or all (default wb-uring,wb-threads)' % ','.join(QEMU_CONFIGS))
ap.add_argument('--no-nbdkit', action='store_true', help='leave nbdkit out')
ap.add_argument('--qnbd', default=os.path.join(REPO, 'target', 'release', 'qnbd'), help='qnbd binary')
ap.add_argument('--qnbd-args', default='', help='extra arguments for qnbd serve (e.g. "--aio=threads")')
ap.add_argument('--qnbd-cache', default='writeback',
                help='cache mode of qnbd serve (default writeback; "none" to compare with the none-* settings)')
ap.add_argument('--extra', action='append', default=[], metavar='NAME=CMD',
                help='another server to measure (template with {SOCK} {PORT} {IMG} {RAW} {FMT}); repeatable')
ap.add_argument('-c', '--ceiling', action='store_true', help="add nbdkit's null plugin (protocol ceiling) on read jobs")
ap.add_argument('-p', '--pin', default='none', choices=['none', 'split', 'same'],
                help='CPU pinning: split = server on the last CPU, client on CPU 0')
ap.add_argument('--map-size', default='1T', help='virtual size of the map image (default 1T)')
ap.add_argument('--map-extents', type=int, default=200000, help='allocated extents in the map image (default 200000)')
ap.add_argument('--verify', action='store_true', help='instead of benchmarking: fio crc32c verify runs against qnbd')
ap.add_argument('-o', '--out', default=os.path.join(REPO, 'target', 'peer'), help='work dir (images, results)')
a = ap.parse_args()

for t in ['fio', 'nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io', 'qemu-nbd'] + ([] if a.no_nbdkit else ['nbdkit']):
    if subprocess.run(['sh', '-c', 'command -v ' + t], capture_output=True).returncode:
        die('missing tool: ' + t)
if not os.access(a.qnbd, os.X_OK):
    die(f'no qnbd binary at {a.qnbd} (cargo build --release)')
if a.quick:
    a.runtime = min(a.runtime, 2)
    if a.qemu == 'wb-uring,wb-threads':
        a.qemu = 'wb-threads'
    if a.transport == 'unix,tcp':
        a.transport = 'unix'
qemu_cfgs = list(QEMU_CONFIGS) if a.qemu == 'all' else a.qemu.split(',')
for c in qemu_cfgs:
    if c not in QEMU_CONFIGS:
        die('unknown qemu-nbd setting ' + c)
transports = a.transport.split(',')
jobs = a.jobs.split(',') if a.jobs else (QUICK_JOBS if a.quick else ALL_JOBS)
tcp_jobs = a.tcp_jobs.split(',') if a.tcp_jobs else ([j for j in TCP_DEFAULT_JOBS if j in jobs] if not a.jobs else jobs)
for j in jobs + tcp_jobs:
    if j not in JOB_SPEC:
        die('unknown job ' + j)
OUT = os.path.abspath(a.out)
os.makedirs(OUT, exist_ok=True)
SIZE = parse_size(a.size)
SOCK = os.path.join(OUT, f'peer.{os.getpid()}.sock')
PORT = 20000 + os.getpid() % 20000

# ------------------------------------------------------------------------------ images
t0 = time.time()
ALLOC = os.path.join(OUT, f'alloc-{a.size}.qcow2')
ALLOC_RAW = os.path.join(OUT, f'alloc-{a.size}.raw')


def make_alloc():
    if os.path.exists(ALLOC) and os.path.exists(ALLOC_RAW):
        return
    print(f'# creating {ALLOC} (+ .raw): {SIZE} bytes of random data, 64 KiB clusters', flush=True)
    sh(f"fio --name=mk --filename='{ALLOC_RAW}' --rw=write --bs=1M --size={SIZE} --ioengine=psync "
       f"--refill_buffers=1 --end_fsync=1 --output=/dev/null")
    sh(f"qemu-img convert -f raw -O qcow2 -o cluster_size=65536 '{ALLOC_RAW}' '{ALLOC}.tmp'")
    os.rename(ALLOC + '.tmp', ALLOC)


CHAIN = [os.path.join(OUT, f'chain-{a.size}-{n}.qcow2') for n in ('base', 'mid', 'top')]


def make_chain():
    """base: the allocated data; mid: every 3rd MiB rewritten; top: every 3rd MiB, shifted by one
    (so a read lands in each layer about equally often)."""
    if all(os.path.exists(p) for p in CHAIN):
        return
    print(f'# creating the 3-deep chain {CHAIN[2]}', flush=True)
    sh(f"qemu-img convert -f raw -O qcow2 -o cluster_size=65536 '{ALLOC_RAW}' '{CHAIN[0]}'")
    for i, (lower, upper) in enumerate([(CHAIN[0], CHAIN[1]), (CHAIN[1], CHAIN[2])]):
        sh(f"qemu-img create -q -f qcow2 -o cluster_size=65536 -b '{lower}' -F qcow2 '{upper}'")
        mib = SIZE >> 20
        cmds = ''.join(f'write -q -P {0x40 + i} {m << 20} 1M\n' for m in range(i, mib, 3))
        subprocess.run(['qemu-io', '-t', 'unsafe', '-f', 'qcow2', upper], input=cmds, text=True,
                       check=True, capture_output=True)


MAP = os.path.join(OUT, f'map-{a.map_size}-{a.map_extents}.qcow2')


def make_map():
    """A sparse image with map_extents allocated clusters, each alone (no two neighbours)."""
    if os.path.exists(MAP):
        return
    vsize = parse_size(a.map_size)
    clusters = vsize >> 16
    stride = max(2, clusters // a.map_extents)
    n = min(a.map_extents, clusters // stride)
    print(f'# creating {MAP}: {n} allocated clusters, one every {stride} (takes a while once)', flush=True)
    sh(f"qemu-img create -q -f qcow2 -o cluster_size=65536 '{MAP}.tmp' {vsize}")
    cmds = ''.join(f'write -q -P 7 {(c * stride) << 16} 512\n' for c in range(n))
    subprocess.run(['qemu-io', '-t', 'unsafe', '-f', 'qcow2', MAP + '.tmp'], input=cmds, text=True,
                   check=True, capture_output=True)
    os.rename(MAP + '.tmp', MAP)


all_jobs = set() if a.verify else set(jobs) | (set(tcp_jobs) if 'tcp' in transports else set())
make_alloc()
if 'chain-randread-4k-qd32' in all_jobs:
    make_chain()
if 'map' in all_jobs:
    make_map()
FRESH = os.path.join(OUT, 'fresh.qcow2')
FRESH_RAW = os.path.join(OUT, 'fresh.raw')
sh('sync')
print(f'# images ready in {time.time() - t0:.0f}s', flush=True)

# ------------------------------------------------------------------------------ servers
QNBD = (f"{shlex.quote(a.qnbd)} serve -f {{FMT}} -t -e 0 --cache={a.qnbd_cache} {a.qnbd_args} "
        f"{{LISTEN}} {{IMG}}")
servers = [('qnbd', QNBD)]
for c in qemu_cfgs:
    servers.append((f'qemu-nbd:{c}', f'qemu-nbd -f {{FMT}} -t -e 4 {QEMU_CONFIGS[c]} {{LISTEN}} {{IMG}}'))
if not a.no_nbdkit:
    servers.append(('nbdkit-file', 'nbdkit -f {LISTEN_NBDKIT} file {RAW}'))
for e in a.extra:
    n, _, c = e.partition('=')
    servers.append((n, c))
if a.ceiling:
    servers.append(('ceiling:nbdkit-null', 'nbdkit -f {LISTEN_NBDKIT} --filter=noextents null {SIZE}'))


def applies(name, job):
    kind = JOB_SPEC[job][1]
    if name.startswith('ceiling'):
        return not ('write' in job) and kind == 'alloc'
    if name == 'nbdkit-file':
        return kind in ('alloc', 'fresh')
    return True


TCK = os.sysconf('SC_CLK_TCK')


def group_procs(pgid):
    out = []
    for p in os.listdir('/proc'):
        if not p.isdigit():
            continue
        try:
            rest = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
            if int(rest[2]) == pgid:
                out.append((int(p), rest))
        except (OSError, IndexError):
            pass
    return out


def group_cpu(pgid):
    return sum(int(r[11]) + int(r[12]) for _, r in group_procs(pgid)) / TCK


def group_hwm(pgid):
    tot = 0
    for pid, _ in group_procs(pgid):
        try:
            for line in open(f'/proc/{pid}/status'):
                if line.startswith('VmHWM'):
                    tot += int(line.split()[1])
        except OSError:
            pass
    return tot / 1024


PIN = {'none': ([], []), 'split': (['taskset', '-c', str(os.cpu_count() - 1)], ['taskset', '-c', '0']),
       'same': (['taskset', '-c', '0'], ['taskset', '-c', '0'])}[a.pin]


class Server:
    def __init__(self, tpl, tr, img, raw, fmt, vsize):
        listen = f'-k {SOCK}' if tr == 'unix' else f'-b 127.0.0.1 -p {PORT}'
        listen_k = f'-U {SOCK}' if tr == 'unix' else f'-i 127.0.0.1 -p {PORT}'
        cmd = tpl.format(LISTEN=listen, LISTEN_NBDKIT=listen_k, IMG=shlex.quote(img), RAW=shlex.quote(raw),
                         FMT=fmt, SIZE=vsize, SOCK=SOCK, PORT=PORT)
        self.cmd = PIN[0] + shlex.split(cmd)
        self.uri = f'nbd+unix:///?socket={SOCK}' if tr == 'unix' else f'nbd://127.0.0.1:{PORT}/'
        self.tr = tr

    def start(self):
        if os.path.exists(SOCK):
            os.unlink(SOCK)
        self.err = open(os.path.join(OUT, 'server.stderr.log'), 'a')
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err,
                                  start_new_session=True)
        t = time.time()
        while time.time() - t < 30:
            if self.p.poll() is not None:
                die(f'server exited rc={self.p.returncode}: {" ".join(self.cmd)} (see {OUT}/server.stderr.log)')
            if subprocess.run(['nbdinfo', '--size', self.uri], capture_output=True).returncode == 0:
                return self
            time.sleep(0.05)
        self.stop()
        die('server not ready after 30s: ' + ' '.join(self.cmd))

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.err.close()


def images_for(name, job):
    kind = JOB_SPEC[job][1]
    if kind == 'alloc':
        return ALLOC, ALLOC_RAW, 'qcow2', SIZE
    if kind == 'fresh':
        for p in (FRESH, FRESH_RAW):
            if os.path.exists(p):
                os.unlink(p)
        sh(f"qemu-img create -q -f qcow2 -o cluster_size=65536 '{FRESH}' {SIZE}")
        sh(f"truncate -s {SIZE} '{FRESH_RAW}'")
        return FRESH, FRESH_RAW, 'qcow2', SIZE
    if kind == 'chain':
        return CHAIN[2], None, 'qcow2', SIZE
    return MAP, None, 'qcow2', parse_size(a.map_size)


def run_one(name, tpl, job, tr):
    img, raw, fmt, vsize = images_for(name, job)
    s = Server(tpl, tr, img, raw or '', fmt, vsize).start()
    try:
        c0 = group_cpu(s.p.pid)
        if job == 'nbdcopy':
            t = time.time()
            sh(' '.join(PIN[1]) + f" nbdcopy '{s.uri}' null:")
            el = time.time() - t
            c1 = group_cpu(s.p.pid)
            r = dict(value=vsize / el / 1e6, unit='MB/s', p99_us=None, bytes=vsize)
        elif job == 'map':
            t = time.time()
            out = sh(' '.join(PIN[1]) + f" nbdinfo --map '{s.uri}'").stdout
            el = time.time() - t
            c1 = group_cpu(s.p.pid)
            r = dict(value=el * 1000, unit='ms', p99_us=None, bytes=0, lines=out.count('\n'))
        else:
            env = dict(os.environ, NBD_URI=s.uri, RUNTIME=str(a.runtime))
            p = subprocess.run(PIN[1] + ['fio', '--output-format=json', os.path.join(FIO_DIR, JOB_SPEC[job][0] + '.fio')],
                               capture_output=True, text=True, env=env)
            c1 = group_cpu(s.p.pid)
            if p.returncode != 0:
                die(f'fio failed for {job} on {name}: {p.stderr[-500:]}')
            jj = json.loads(p.stdout[p.stdout.index('{'):])['jobs'][0]
            nbytes = jj['read']['io_bytes'] + jj['write']['io_bytes']
            d = 'read' if jj['read']['iops'] > 0 else 'write'
            p99 = jj[d]['clat_ns'].get('percentile', {}).get('99.000000', 0) / 1000
            if '1m' in job:
                r = dict(value=(jj['read']['bw_bytes'] + jj['write']['bw_bytes']) / 1e6, unit='MB/s')
            else:
                r = dict(value=jj['read']['iops'] + jj['write']['iops'], unit='IOPS')
            r.update(p99_us=p99, bytes=nbytes)
        r['srv_cpu_s'] = c1 - c0
        r['cpu_s_per_GB'] = (c1 - c0) / (r['bytes'] / 1e9) if r['bytes'] else None
        r['rss_MiB'] = group_hwm(s.p.pid)
    finally:
        s.stop()
    return r


def verify():
    """fio writes with crc32c verification against qnbd on a fresh image and on the allocated one."""
    ok = True
    for job in ['verify-randwrite-4k-qd16', 'verify-randwrite-mixed-qd32']:
        for kind in ['fresh', 'alloc']:
            img = ALLOC
            if kind == 'fresh':
                img = images_for('qnbd', 'randwrite-4k-qd32-fresh')[0]
            s = Server(QNBD, 'unix', img, '', 'qcow2', SIZE).start()
            try:
                env = dict(os.environ, NBD_URI=s.uri, VSIZE=str(min(SIZE, 256 << 20)))
                p = subprocess.run(['fio', '--output-format=terse', '--terse-version=3',
                                    os.path.join(FIO_DIR, job + '.fio')], capture_output=True, text=True, env=env,
                                   cwd=OUT)  # fio leaves its verify state files in the working directory
            finally:
                s.stop()
            chk = subprocess.run(['qemu-img', 'check', '-q', img], capture_output=True, text=True)
            res = 'ok' if p.returncode == 0 and chk.returncode == 0 else 'FAILED'
            ok &= res == 'ok'
            print(f'  {job:30s} {kind:6s} fio rc={p.returncode} qemu-img check rc={chk.returncode}  {res}', flush=True)
            if p.returncode:
                print(p.stderr[-1000:], p.stdout[-1000:])
    sys.exit(0 if ok else 1)


if a.verify:
    verify()

# ------------------------------------------------------------------------------ main loop
print(f'# qnbd {a.qnbd}; size {a.size}; reps {a.reps}; runtime {a.runtime}s; pin {a.pin}; '
      f'transports {",".join(transports)}', flush=True)
for n, c in servers:
    print(f'#   {n}: {c}', flush=True)
results = {}
T0 = time.time()
plan = [(tr, j) for tr in transports for j in (jobs if tr == 'unix' else tcp_jobs)]
for tr, job in plan:
    srvs = [s for s in servers if applies(s[0], job)]
    # warm the page cache for every server alike (image building may have evicted it)
    kind = JOB_SPEC[job][1]
    warm = {'alloc': [ALLOC, ALLOC_RAW], 'chain': CHAIN, 'map': [MAP]}.get(kind, [])
    for f in warm:
        sh(f"cat '{f}' > /dev/null")
    for rep in range(a.reps):
        for name, tpl in (srvs if rep % 2 == 0 else list(reversed(srvs))):
            r = run_one(name, tpl, job, tr)
            results.setdefault(f'{tr}:{job}', {}).setdefault(name, []).append(r)
            print(f'  {tr:4s} {job:24s} rep{rep} {name:20s} {r["value"]:10.0f} {r["unit"]:4s} '
                  f'p99 {r["p99_us"] or 0:7.0f}us  srvCPU {r["cpu_s_per_GB"] or 0:6.2f}s/GB  '
                  f'RSS {r["rss_MiB"]:6.1f}MiB', flush=True)
    if os.path.exists(SOCK):
        os.unlink(SOCK)

# ------------------------------------------------------------------------------ report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fnum(x, nd=0):
    return '-' if x is None else f'{x:,.{nd}f}'


names = [n for n, _ in servers]
qemus = [n for n in names if n.startswith('qemu-nbd')]
lines = ['| transport:job | unit | ' + ' | '.join(names) +
         ' | qnbd / best qemu-nbd | qnbd / nbdkit | p99 µs qnbd / qemu | CPU s/GB qnbd / qemu / nbdkit | RSS MiB qnbd / qemu |',
         '|' + '---|' * (len(names) + 7)]
summary = {}
for key, rs in results.items():
    unit = next(iter(rs.values()))[0]['unit']
    lower_better = unit == 'ms'
    row = [key, unit]
    meds = {}
    for n in names:
        if n not in rs:
            row.append('—')
            continue
        v = [r['value'] for r in rs[n]]
        meds[n] = med(v)
        row.append(f'{fnum(meds[n])} [{fnum(min(v))}–{fnum(max(v))}]')
    qm = [n for n in qemus if n in meds]
    best_q = (min if lower_better else max)(qm, key=lambda n: meds[n]) if qm else None

    def ratio(ref):
        if ref not in meds or 'qnbd' not in meds or not meds[ref] or not meds['qnbd']:
            return None
        return meds[ref] / meds['qnbd'] if lower_better else meds['qnbd'] / meds[ref]
    rq, rk = ratio(best_q), ratio('nbdkit-file')
    row.append(f'{rq:.2f}× ({best_q.split(":")[1]})' if rq else '—')
    row.append(f'{rk:.2f}×' if rk else '—')

    def m(n, k, nd=0):
        return fnum(med([r[k] for r in rs[n]]), nd) if n in rs else '-'
    row.append(f'{m("qnbd", "p99_us")} / {m(best_q, "p99_us") if best_q else "-"}')
    row.append(f'{m("qnbd", "cpu_s_per_GB", 2)} / {m(best_q, "cpu_s_per_GB", 2) if best_q else "-"} / {m("nbdkit-file", "cpu_s_per_GB", 2)}')
    row.append(f'{m("qnbd", "rss_MiB", 1)} / {m(best_q, "rss_MiB", 1) if best_q else "-"}')
    lines.append('| ' + ' | '.join(row) + ' |')
    summary[key] = dict(medians=meds, best_qemu=best_q, vs_qemu=rq, vs_nbdkit=rk)
print()
print('\n'.join(lines))
for tr in transports:
    one, two = summary.get(f'{tr}:randread-4k-qd32'), summary.get(f'{tr}:randread-4k-qd32-2conn')
    if one and two and one['medians'].get('qnbd'):
        print(f'\n{tr}: qnbd 2 connections / 1 connection (4k QD32 randread): '
              f'{two["medians"]["qnbd"] / one["medians"]["qnbd"]:.2f}×')
el = time.time() - T0
print(f'\n# total benchmark time {el:.0f}s (image preparation excluded)')
stamp = time.strftime('%Y%m%d-%H%M%S')
with open(os.path.join(OUT, f'results-{stamp}.json'), 'w') as f:
    json.dump(dict(servers=servers, size=SIZE, reps=a.reps, runtime=a.runtime, pin=a.pin, results=results,
                   summary=summary, elapsed_s=el), f, indent=1)
with open(os.path.join(OUT, f'results-{stamp}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
print(f'# results: {OUT}/results-{stamp}.json and .md')
