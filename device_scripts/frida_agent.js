/*
 * flowtruth frida agent: reports which process and thread own which Internet socket.
 *
 * Hooks libc's connect, sendto, sendmsg, recvfrom, close and getaddrinfo (and bionic's
 * android_getaddrinfofornet, the resolver Android's Java stack calls directly), and on a
 * libc other than bionic also send and recv (bionic's send and recv call its sendto and
 * recvfrom; glibc's make the system calls themselves), and posts
 * batches of events with send({type: "events", events: [...]}). The loader writes each
 * event as one JSON line:
 *
 *   {"ts": <epoch seconds, float, CLOCK_REALTIME>, "event": "connect"|"sendto"|"sendmsg"|
 *    "recvfrom"|"send"|"recv"|"getaddrinfo"|"close", "pid": N, "tid": N, "fd": N, "proto": "tcp"|"udp",
 *    "family": 4|6, "local": {"ip": "...", "port": N}, "remote": {"ip": "...", "port": N},
 *    "host": "name" or null, "ret": N, "process": "argv[0]"}
 *
 * - local comes from getsockname() after the call returned (so it holds the port that an
 *   implicit bind chose); remote from the sockaddr argument, else getpeername(); either
 *   is null when unknown (e.g. getsockname on a socket that is not bound yet).
 * - IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are reported as dotted IPv4 with family
 *   4: that is what the packets on the wire carry. IPv6 text is RFC 5952 (as Python's
 *   ipaddress prints it); a scope id is dropped.
 * - proto is from getsockopt(SO_TYPE); only AF_INET/AF_INET6 stream and datagram sockets
 *   are reported, so Unix sockets and netlink never appear.
 * - ret is the function's return value; when it is -1 the event also has "errno", the
 *   error's name (e.g. "EINPROGRESS" for a non-blocking connect under way; "E<n>" for a
 *   number without a name here).
 * - sendto, sendmsg, recvfrom, send and recv are reported when they succeed, once per
 *   (fd, remote address) until the fd is closed, which keeps busy sockets from flooding
 *   the log (a repeat costs a map lookup, no system call); close is reported only for fds
 *   the agent reported before, with their last known addresses. A socket connected before
 *   the agent was loaded shows up at its first send or receive through these functions
 *   (not through write or read, which TLS libraries use).
 * - Events are sent in batches every 50 ms and when the script unloads (also at a normal
 *   process exit); a process killed by SIGKILL loses at most its last 50 ms.
 * - getaddrinfo: one event per distinct resolved address, with fd -1, local null, host
 *   the name asked for and remote.port the service port (0 when none was given); proto
 *   is null unless the hints or the result name a socket type.
 * - process is argv[0] from /proc/self/cmdline, the package name (or "pkg:service") for
 *   an Android app.
 *
 * Uses the frida 17 API only (no static Module.* helpers).
 */
'use strict';

const AF_INET = 2;
const AF_INET6 = 10;
const SOL_SOCKET = 1;
const SO_TYPE = 3;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const CLOCK_REALTIME = 0;
const FLUSH_MS = 50;
const MAX_BATCH = 200;

const PID = Process.id;
const PTR = Process.pointerSize;

// --- libc --------------------------------------------------------------------------------

function findLibc() {
  const names = ['libc.so', 'libc.so.6', 'libc.so.7', 'libc.musl-x86_64.so.1'];
  for (const n of names) {
    const m = Process.findModuleByName(n);
    if (m !== null) return m;
  }
  for (const m of Process.enumerateModules()) {
    if (/^libc[.-]/.test(m.name) && m.findExportByName('connect') !== null) return m;
  }
  return null;
}

const LIBC = findLibc();
// bionic's struct addrinfo has ai_canonname before ai_addr (BSD order); glibc the reverse.
const BIONIC = LIBC !== null && LIBC.name === 'libc.so';

function libcExport(name) {
  let p = LIBC !== null ? LIBC.findExportByName(name) : null;
  if (p === null) p = Module.findGlobalExportByName(name);
  return p;
}

function nativeFn(name, ret, args) {
  const p = libcExport(name);
  // exclusive: keep the JS lock during the call, so no other hook runs meanwhile.
  return p === null ? null : new NativeFunction(p, ret, args, { scheduling: 'exclusive' });
}

const getsockname = nativeFn('getsockname', 'int', ['int', 'pointer', 'pointer']);
const getpeername = nativeFn('getpeername', 'int', ['int', 'pointer', 'pointer']);
const getsockopt = nativeFn('getsockopt', 'int', ['int', 'int', 'int', 'pointer', 'pointer']);
const clockGettime = nativeFn('clock_gettime', 'int', ['int', 'pointer']);
const openFn = nativeFn('open', 'int', ['pointer', 'int']);
const readFn = nativeFn('read', 'int', ['int', 'pointer', 'int']);
const closeFn = nativeFn('close', 'int', ['int']);

// --- helpers -----------------------------------------------------------------------------

function now() {
  if (clockGettime !== null) {
    const ts = Memory.alloc(16);
    if (clockGettime(CLOCK_REALTIME, ts) === 0) {
      let sec, nsec;
      if (PTR === 8) {
        sec = ts.readS64().toNumber();
        nsec = ts.add(8).readS64().toNumber();
      } else {
        sec = ts.readS32();
        nsec = ts.add(4).readS32();
      }
      return sec + nsec / 1e9;
    }
  }
  return Date.now() / 1000;
}

function readArgv0() {
  try {
    if (openFn === null || readFn === null || closeFn === null) return null;
    const fd = openFn(Memory.allocUtf8String('/proc/self/cmdline'), 0);
    if (fd < 0) return null;
    const buf = Memory.alloc(4096);
    const n = readFn(fd, buf, 4095);
    closeFn(fd);
    if (n <= 0) return null;
    buf.add(n).writeU8(0);
    return buf.readUtf8String();
  } catch (e) {
    return null;
  }
}

const PROCESS = readArgv0();

function hex4(v) {
  return v.toString(16);
}

// RFC 5952 text of 8 16-bit groups: longest run (>= 2) of zero groups becomes "::".
function ipv6Text(groups) {
  let bestStart = -1, bestLen = 0;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) { i++; continue; }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen && j - i >= 2) { bestStart = i; bestLen = j - i; }
    i = j;
  }
  if (bestStart < 0) return groups.map(hex4).join(':');
  const head = groups.slice(0, bestStart).map(hex4).join(':');
  const tail = groups.slice(bestStart + bestLen).map(hex4).join(':');
  return head + '::' + tail;
}

// Parses a sockaddr_in / sockaddr_in6: {family: 4|6, ip, port}, or null for other families.
function parseSockaddr(p, len) {
  if (p.isNull()) return null;
  if (len !== undefined && len < 2) return null;
  const family = p.readU16();
  if (family === AF_INET) {
    if (len !== undefined && len < 8) return null;
    const port = (p.add(2).readU8() << 8) | p.add(3).readU8();
    const b = p.add(4).readByteArray(4);
    const a = new Uint8Array(b);
    return { family: 4, ip: a[0] + '.' + a[1] + '.' + a[2] + '.' + a[3], port: port };
  }
  if (family === AF_INET6) {
    if (len !== undefined && len < 24) return null;
    const port = (p.add(2).readU8() << 8) | p.add(3).readU8();
    const a = new Uint8Array(p.add(8).readByteArray(16));
    let mapped = a[10] === 0xff && a[11] === 0xff;
    for (let i = 0; i < 10 && mapped; i++) if (a[i] !== 0) mapped = false;
    if (mapped) {
      return { family: 4, ip: a[12] + '.' + a[13] + '.' + a[14] + '.' + a[15], port: port };
    }
    const groups = [];
    for (let i = 0; i < 16; i += 2) groups.push((a[i] << 8) | a[i + 1]);
    return { family: 6, ip: ipv6Text(groups), port: port };
  }
  return null;
}

function sockAddrOf(fn, fd) {
  if (fn === null) return null;
  const sa = Memory.alloc(128);
  const len = Memory.alloc(4);
  len.writeU32(128);
  if (fn(fd, sa, len) !== 0) return null;
  return parseSockaddr(sa, len.readU32());
}

function sockType(fd) {
  if (getsockopt === null) return null;
  const v = Memory.alloc(4);
  const len = Memory.alloc(4);
  len.writeU32(4);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, v, len) !== 0) return null;
  const t = v.readS32() & 0xf; // strip SOCK_NONBLOCK/SOCK_CLOEXEC, never set here anyway
  if (t === SOCK_STREAM) return 'tcp';
  if (t === SOCK_DGRAM) return 'udp';
  return null;
}

function endpoint(a) {
  return a === null ? null : { ip: a.ip, port: a.port };
}

// Linux errno numbers (the same on arm, arm64, x86 and x86_64) a socket call may give.
const ERRNO_NAMES = {
  1: 'EPERM', 2: 'ENOENT', 4: 'EINTR', 9: 'EBADF', 11: 'EAGAIN', 12: 'ENOMEM',
  13: 'EACCES', 14: 'EFAULT', 22: 'EINVAL', 24: 'EMFILE', 32: 'EPIPE', 88: 'ENOTSOCK',
  89: 'EDESTADDRREQ', 90: 'EMSGSIZE', 91: 'EPROTOTYPE', 93: 'EPROTONOSUPPORT',
  95: 'EOPNOTSUPP', 97: 'EAFNOSUPPORT', 98: 'EADDRINUSE', 99: 'EADDRNOTAVAIL',
  100: 'ENETDOWN', 101: 'ENETUNREACH', 103: 'ECONNABORTED', 104: 'ECONNRESET',
  105: 'ENOBUFS', 106: 'EISCONN', 107: 'ENOTCONN', 110: 'ETIMEDOUT', 111: 'ECONNREFUSED',
  113: 'EHOSTUNREACH', 114: 'EALREADY', 115: 'EINPROGRESS',
};

// {ret, errno}: errno is the error's name when the call returned -1, else undefined.
function retOf(ctx, retval) {
  const r = retval.toInt32();
  let errno;
  if (r === -1 && ctx.errno !== undefined && ctx.errno !== 0) {
    errno = ERRNO_NAMES[ctx.errno] || 'E' + ctx.errno;
  }
  return { ret: r, errno: errno };
}

// --- output ------------------------------------------------------------------------------

let batch = [];
let timer = null;

function flush() {
  if (timer !== null) { clearTimeout(timer); timer = null; }
  if (batch.length === 0) return;
  const events = batch;
  batch = [];
  send({ type: 'events', events: events });
}

function emit(ev) {
  batch.push(ev);
  if (batch.length >= MAX_BATCH) flush();
  else if (timer === null) timer = setTimeout(flush, FLUSH_MS);
}

// r: {ret, errno} from retOf, or a plain number.
function event(name, tid, fd, proto, local, remote, host, r) {
  const fam = remote !== null ? remote.family : (local !== null ? local.family : null);
  const ev = {
    ts: now(), event: name, pid: PID, tid: tid, fd: fd, proto: proto, family: fam,
    local: endpoint(local), remote: endpoint(remote), host: host,
    ret: typeof r === 'number' ? r : r.ret, process: PROCESS,
  };
  if (typeof r !== 'number' && r.errno !== undefined) ev.errno = r.errno;
  return ev;
}

// fd -> {proto, local, remote, seen: Set of remote keys}
const sockets = new Map();

function remember(fd, proto, local, remote) {
  let s = sockets.get(fd);
  if (s === undefined) {
    s = { proto: proto, local: local, remote: remote, seen: new Set() };
    sockets.set(fd, s);
  } else {
    s.proto = proto;
    if (local !== null) s.local = local;
    if (remote !== null) s.remote = remote;
  }
  return s;
}

// Shared tail of sendto / sendmsg / recvfrom: one event per (fd, remote) until close.
function transferKey(name, remote) {
  return name + '|' + (remote === null ? '-' : remote.ip + ']' + remote.port);
}

function reportTransfer(name, ctx, fd, remote, r) {
  // A failed transfer sent or received nothing (EAGAIN on non-blocking sockets is common).
  if (r.ret < 0) return;
  // Fast path, no system calls: this socket already reported this peer.
  const known = sockets.get(fd);
  if (known !== undefined) {
    const peer = remote !== null ? remote : known.remote;
    if (peer !== null && known.seen.has(transferKey(name, peer))) return;
  }
  const proto = sockType(fd);
  if (proto === null) return;
  const local = sockAddrOf(getsockname, fd);
  if (remote === null) remote = sockAddrOf(getpeername, fd);
  if (local === null && remote === null) return; // not an Internet socket
  const key = transferKey(name, remote);
  if (known !== undefined && known.seen.has(key)) return;
  const s = remember(fd, proto, local, remote);
  s.seen.add(key);
  emit(event(name, ctx.threadId, fd, proto, local, remote, null, r));
}

// --- hooks -------------------------------------------------------------------------------

const hooked = [];

let hookErrors = 0;

// A failing callback must never take the app down: count it, report the first few.
function guarded(name, fn) {
  return function (arg) {
    try {
      fn.call(this, arg);
    } catch (e) {
      hookErrors++;
      if (hookErrors <= 5) send({ type: 'hook-error', hook: name, error: String(e) });
    }
  };
}

function hook(name, callbacks) {
  const p = libcExport(name);
  if (p === null) return;
  const cb = {};
  if (callbacks.onEnter) cb.onEnter = guarded(name, callbacks.onEnter);
  if (callbacks.onLeave) cb.onLeave = guarded(name, callbacks.onLeave);
  Interceptor.attach(p, cb);
  hooked.push(name);
}

hook('connect', {
  onEnter(args) {
    this.fd = args[0].toInt32();
    this.remote = parseSockaddr(args[1], args[2].toInt32());
  },
  onLeave(retval) {
    if (this.remote === null) return;
    const fd = this.fd;
    const proto = sockType(fd);
    if (proto === null) return;
    const local = sockAddrOf(getsockname, fd);
    const s = remember(fd, proto, local, this.remote);
    s.seen.clear();
    emit(event('connect', this.threadId, fd, proto, local, this.remote, null,
               retOf(this, retval)));
  },
});

hook('sendto', {
  onEnter(args) {
    this.fd = args[0].toInt32();
    this.remote = args[4].isNull() ? null : parseSockaddr(args[4], args[5].toInt32());
  },
  onLeave(retval) {
    reportTransfer('sendto', this, this.fd, this.remote, retOf(this, retval));
  },
});

hook('sendmsg', {
  onEnter(args) {
    this.fd = args[0].toInt32();
    this.remote = null;
    const msg = args[1];
    if (!msg.isNull()) {
      const name = msg.readPointer();
      if (!name.isNull()) this.remote = parseSockaddr(name, msg.add(PTR).readU32());
    }
  },
  onLeave(retval) {
    reportTransfer('sendmsg', this, this.fd, this.remote, retOf(this, retval));
  },
});

hook('recvfrom', {
  onEnter(args) {
    this.fd = args[0].toInt32();
    this.src = args[4];
    this.srcLen = args[5];
  },
  onLeave(retval) {
    const r = retOf(this, retval);
    let remote = null;
    if (r.ret >= 0 && !this.src.isNull() && !this.srcLen.isNull()) {
      remote = parseSockaddr(this.src, this.srcLen.readU32());
    }
    reportTransfer('recvfrom', this, this.fd, remote, r);
  },
});

// A socket connected before the agent came (the loader attaches to running processes)
// shows up at its next transfer.
if (!BIONIC) {
  hook('send', {
    onEnter(args) { this.fd = args[0].toInt32(); },
    onLeave(retval) { reportTransfer('send', this, this.fd, null, retOf(this, retval)); },
  });
  hook('recv', {
    onEnter(args) { this.fd = args[0].toInt32(); },
    onLeave(retval) { reportTransfer('recv', this, this.fd, null, retOf(this, retval)); },
  });
}

hook('close', {
  onEnter(args) {
    this.fd = args[0].toInt32();
    this.s = sockets.get(this.fd);
    if (this.s !== undefined) sockets.delete(this.fd);
  },
  onLeave(retval) {
    const s = this.s;
    if (s === undefined) return;
    emit(event('close', this.threadId, this.fd, s.proto, s.local, s.remote, null,
               retOf(this, retval)));
  },
});

// Resolver: getaddrinfo may call android_getaddrinfofornet internally; only the
// outermost call on a thread is reported.
const resolving = new Map(); // thread id -> depth

function resolverHook(resArgIndex) {
  return {
    onEnter(args) {
      const depth = resolving.get(this.threadId) || 0;
      resolving.set(this.threadId, depth + 1);
      this.outer = depth === 0;
      if (!this.outer) return;
      this.host = args[0].isNull() ? null : args[0].readUtf8String();
      this.port = 0;
      if (!args[1].isNull()) {
        const n = parseInt(args[1].readUtf8String(), 10);
        if (!isNaN(n)) this.port = n;
      }
      this.hintType = args[2].isNull() ? 0 : args[2].add(8).readS32();
      this.res = args[resArgIndex];
    },
    onLeave(retval) {
      const depth = resolving.get(this.threadId) || 1;
      if (depth <= 1) resolving.delete(this.threadId);
      else resolving.set(this.threadId, depth - 1);
      if (!this.outer) return;
      const ret = retval.toInt32();
      if (ret !== 0 || this.res.isNull()) return;
      const found = new Map(); // ip -> {a, protos}
      let ai = this.res.readPointer();
      // struct addrinfo: 4 ints + socklen_t (padded to a pointer on 64-bit), 3 pointers.
      const ptrBase = PTR === 8 ? 24 : 20;
      const addrOff = BIONIC ? ptrBase + PTR : ptrBase;
      const altOff = BIONIC ? ptrBase : ptrBase + PTR;
      for (let guard = 0; !ai.isNull() && guard < 256; guard++) {
        const family = ai.add(4).readS32();
        const socktype = ai.add(8).readS32() || this.hintType;
        const addrlen = ai.add(16).readU32();
        let sa = ai.add(addrOff).readPointer();
        // Trust the layout only if the family matches; else try the other order.
        if (sa.isNull() || sa.readU16() !== family) sa = ai.add(altOff).readPointer();
        const a = sa.isNull() ? null : parseSockaddr(sa, addrlen);
        if (a !== null) {
          const proto = socktype === SOCK_STREAM ? 'tcp' : (socktype === SOCK_DGRAM ? 'udp' : null);
          let f = found.get(a.ip);
          if (f === undefined) {
            f = { a: a, protos: new Set() };
            found.set(a.ip, f);
          }
          f.protos.add(proto);
        }
        ai = ai.add(ptrBase + 2 * PTR).readPointer();
      }
      // One event per address, in resolver order; proto only when the answer is unanimous.
      for (const f of found.values()) {
        const proto = f.protos.size === 1 ? f.protos.values().next().value : null;
        emit(event('getaddrinfo', this.threadId, -1, proto, null,
                   { family: f.a.family, ip: f.a.ip, port: this.port }, this.host, ret));
      }
    },
  };
}

hook('getaddrinfo', resolverHook(3));
hook('android_getaddrinfofornet', resolverHook(5));

rpc.exports = {
  // Called by frida when the script is unloaded, including when the process exits.
  dispose() {
    flush();
  },
  // Sends everything still queued; the loader calls it before unloading the script.
  flush() {
    flush();
    return true;
  },
  info() {
    return { pid: PID, process: PROCESS, libc: LIBC === null ? null : LIBC.path,
             bionic: BIONIC, hooks: hooked, hook_errors: hookErrors };
  },
};
