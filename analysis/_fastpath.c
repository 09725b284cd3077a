/* flowtruth's packet fast path: pcap record walking, header decoding, bi-flow
 * assembly and MIRAGE statistics over numpy buffers.
 *
 * Plain C functions called through ctypes (analysis/_fast.py owns every buffer and
 * checks sizes before each call); a stub PyInit keeps this a valid extension module
 * so setuptools builds and installs it like one. No JIT, so start-up is instant and
 * resident memory small; analysis/stats.py keeps the numba reference of the
 * statistics that tests cross-check against.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_COLS 15
enum { C_STATUS, C_VER, C_PROTO, C_SPORT, C_DPORT, C_IPLEN, C_IPHDR, C_L4HDR, C_PAYLEN,
       C_FLAGS, C_WIN, C_MSS, C_WS, C_PAYOFF, C_PAYCAP };

#define S_COLS 12
enum { S_SLOT, S_TS, S_DIR, S_IPLEN, S_IPHDR, S_L4HDR, S_PAYLEN, S_FLAGS, S_WIN, S_FRAME,
       S_PAYOFF, S_PAYCAP };

static inline int64_t u16be(const uint8_t *b, int64_t o) {
    return ((int64_t)b[o] << 8) | (int64_t)b[o + 1];
}
static inline int64_t u32x(const uint8_t *b, int64_t o, int swapped) {
    if (swapped)
        return ((int64_t)b[o] << 24) | ((int64_t)b[o + 1] << 16) | ((int64_t)b[o + 2] << 8) |
               (int64_t)b[o + 3];
    return ((int64_t)b[o + 3] << 24) | ((int64_t)b[o + 2] << 16) | ((int64_t)b[o + 1] << 8) |
           (int64_t)b[o];
}
static inline uint64_t u64be(const uint8_t *b, int64_t o) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | b[o + i];
    return v;
}

/* Walk pcap records in buf[start:end). res = {n, next_pos, bad_len or -1}. */
void ft_walk_pcap(const uint8_t *buf, int64_t start, int64_t end, int swapped, int64_t frac_ns,
                  int64_t limit, int64_t cap, int64_t *rec_off, int64_t *caplen,
                  int64_t *wirelen, int64_t *ts_ns, int64_t *res) {
    int64_t pos = start, n = 0;
    res[2] = -1;
    while (n < cap && pos + 16 <= end) {
        int64_t incl = u32x(buf, pos + 8, swapped);
        if (incl > limit) { res[2] = incl; break; }
        if (pos + 16 + incl > end) break;
        ts_ns[n] = u32x(buf, pos, swapped) * 1000000000LL + u32x(buf, pos + 4, swapped) * frac_ns;
        rec_off[n] = pos + 16;
        caplen[n] = incl;
        wirelen[n] = u32x(buf, pos + 12, swapped);
        n++;
        pos += 16 + incl;
    }
    res[0] = n;
    res[1] = pos;
}

/* Decode link, IP and TCP/UDP headers; out is n x N_COLS, addrs n x 4. */
void ft_decode(const uint8_t *buf, int64_t n, const int64_t *rec_off, const int64_t *caplen,
               const int64_t *linktype, int64_t *out, uint64_t *addrs) {
    for (int64_t i = 0; i < n; i++) {
        int64_t *row = out + i * N_COLS;
        uint64_t *ad = addrs + i * 4;
        memset(row, 0, sizeof(int64_t) * N_COLS);
        ad[0] = ad[1] = ad[2] = ad[3] = 0;
        int64_t base = rec_off[i], end = base + caplen[i], lt = linktype[i];
        int64_t off = base, tot, iphdr, l4, proto;
        int ver = 0;
        if (lt == 1) {
            if (end - off < 14) { row[C_STATUS] = 3; continue; }
            int64_t et = u16be(buf, off + 12);
            off += 14;
            while (et == 0x8100 || et == 0x88A8 || et == 0x9100) {
                if (end - off < 4) break;
                et = u16be(buf, off + 2);
                off += 4;
            }
            if (et == 0x0800) ver = 4;
            else if (et == 0x86DD) ver = 6;
            else { row[C_STATUS] = 2; continue; }
        } else if (lt == 113 || lt == 276) {
            int64_t hl = lt == 113 ? 16 : 20;
            if (end - off < hl) { row[C_STATUS] = 3; continue; }
            int64_t et = u16be(buf, off + (lt == 113 ? 14 : 0));
            off += hl;
            if (et == 0x0800) ver = 4;
            else if (et == 0x86DD) ver = 6;
            else { row[C_STATUS] = 2; continue; }
        } else if (lt == 0 || lt == 108) {
            if (end - off < 4) { row[C_STATUS] = 3; continue; }
            off += 4;
            ver = -1;
        } else if (lt == 101 || lt == 12 || lt == 14) {
            ver = -1;
        } else if (lt == 228) {
            ver = 4;
        } else if (lt == 229) {
            ver = 6;
        } else {
            row[C_STATUS] = 1;
            continue;
        }
        if (end - off < 1) { row[C_STATUS] = 4; continue; }
        int nib = buf[off] >> 4;
        if (ver == -1) {
            if (nib == 4) ver = 4;
            else if (nib == 6) ver = 6;
            else { row[C_STATUS] = 2; continue; }
        }
        if (nib != ver) { row[C_STATUS] = 4; continue; }
        if (ver == 4) {
            if (end - off < 20) { row[C_STATUS] = 4; continue; }
            int64_t ihl = (int64_t)(buf[off] & 0x0F) * 4;
            tot = u16be(buf, off + 2);
            if (ihl < 20 || end - off < ihl) { row[C_STATUS] = 4; continue; }
            if (tot == 0) tot = end - off; /* TSO: length left to the NIC */
            if (tot < ihl) { row[C_STATUS] = 4; continue; }
            int64_t fragw = u16be(buf, off + 6);
            proto = buf[off + 9];
            ad[1] = ((uint64_t)buf[off + 12] << 24) | ((uint64_t)buf[off + 13] << 16) |
                    ((uint64_t)buf[off + 14] << 8) | buf[off + 15];
            ad[3] = ((uint64_t)buf[off + 16] << 24) | ((uint64_t)buf[off + 17] << 16) |
                    ((uint64_t)buf[off + 18] << 8) | buf[off + 19];
            row[C_VER] = 4;
            row[C_IPLEN] = tot;
            row[C_PROTO] = proto;
            if ((fragw & 0x1FFF) != 0) { row[C_STATUS] = 6; continue; }
            iphdr = ihl;
            l4 = off + ihl;
        } else {
            if (end - off < 40) { row[C_STATUS] = 4; continue; }
            int64_t plen = u16be(buf, off + 4);
            int64_t nh = buf[off + 6];
            ad[0] = u64be(buf, off + 8);
            ad[1] = u64be(buf, off + 16);
            ad[2] = u64be(buf, off + 24);
            ad[3] = u64be(buf, off + 32);
            row[C_VER] = 6;
            tot = plen ? 40 + plen : end - off;
            row[C_IPLEN] = tot;
            int64_t p = off + 40;
            int bad = 0, frag_later = 0;
            for (;;) {
                if (nh == 0 || nh == 43 || nh == 60 || nh == 135 || nh == 139 || nh == 140) {
                    if (end - p < 8) { bad = 1; break; }
                    int64_t hl = ((int64_t)buf[p + 1] + 1) * 8;
                    nh = buf[p];
                    p += hl;
                } else if (nh == 44) {
                    if (end - p < 8) { bad = 1; break; }
                    if (u16be(buf, p + 2) & 0xFFF8) frag_later = 1;
                    nh = buf[p];
                    p += 8;
                } else if (nh == 51) {
                    if (end - p < 8) { bad = 1; break; }
                    int64_t hl = ((int64_t)buf[p + 1] + 2) * 4;
                    nh = buf[p];
                    p += hl;
                } else {
                    break;
                }
                if (p > end) { bad = 1; break; }
            }
            row[C_PROTO] = nh;
            if (bad) { row[C_STATUS] = 4; continue; }
            if (frag_later) { row[C_STATUS] = 6; continue; }
            proto = nh;
            iphdr = p - off;
            l4 = p;
        }
        row[C_IPHDR] = iphdr;
        if (proto == 6) {
            if (end - l4 < 20) { row[C_STATUS] = 7; continue; }
            int64_t doff = (int64_t)(buf[l4 + 12] >> 4) * 4;
            if (doff < 20) { row[C_STATUS] = 8; continue; }
            row[C_SPORT] = u16be(buf, l4);
            row[C_DPORT] = u16be(buf, l4 + 2);
            int64_t flags = buf[l4 + 13];
            row[C_FLAGS] = flags;
            row[C_WIN] = u16be(buf, l4 + 14);
            row[C_L4HDR] = doff;
            row[C_MSS] = -1;
            row[C_WS] = -1;
            if (flags & 0x02) {
                int64_t q = l4 + 20, qe = l4 + doff < end ? l4 + doff : end;
                while (q < qe) {
                    uint8_t kind = buf[q];
                    if (kind == 0) break;
                    if (kind == 1) { q++; continue; }
                    if (q + 1 >= qe) break;
                    int64_t ln = buf[q + 1];
                    if (ln < 2 || q + ln > qe) break;
                    if (kind == 2 && ln == 4) row[C_MSS] = u16be(buf, q + 2);
                    else if (kind == 3 && ln == 3) row[C_WS] = buf[q + 2];
                    q += ln;
                }
            }
        } else if (proto == 17) {
            if (end - l4 < 8) { row[C_STATUS] = 7; continue; }
            row[C_SPORT] = u16be(buf, l4);
            row[C_DPORT] = u16be(buf, l4 + 2);
            row[C_L4HDR] = 8;
            row[C_MSS] = -1;
            row[C_WS] = -1;
        } else {
            row[C_STATUS] = 5;
            continue;
        }
        int64_t pay = tot - iphdr - row[C_L4HDR];
        if (pay < 0) pay = 0;
        row[C_PAYLEN] = pay;
        int64_t po = l4 + row[C_L4HDR];
        row[C_PAYOFF] = po - base;
        int64_t avail = end - po;
        if (avail < 0) avail = 0;
        row[C_PAYCAP] = avail < pay ? avail : pay;
    }
}

/* ---- bi-flow assembly ------------------------------------------------------------ */

static inline uint64_t mix(uint64_t a_hi, uint64_t a_lo, uint64_t b_hi, uint64_t b_lo,
                           uint64_t meta) {
    const uint64_t M1 = 0x9E3779B97F4A7C15ULL, M2 = 0xBF58476D1CE4E5B9ULL;
    uint64_t h = a_hi * M1;
    h ^= (h >> 29) ^ a_lo; h *= M2;
    h ^= (h >> 31) ^ b_hi; h *= M1;
    h ^= (h >> 29) ^ b_lo; h *= M2;
    h ^= (h >> 31) ^ meta; h *= M1;
    h ^= h >> 32;
    return h;
}

static inline int64_t ht_find(int64_t ht_size, const int64_t *ht, const uint64_t *f_key,
                              uint64_t a_hi, uint64_t a_lo, uint64_t b_hi, uint64_t b_lo,
                              uint64_t meta) {
    uint64_t mask = (uint64_t)ht_size - 1;
    int64_t i = (int64_t)(mix(a_hi, a_lo, b_hi, b_lo, meta) & mask);
    for (;;) {
        int64_t s = ht[i];
        if (s < 0) return i;
        const uint64_t *k = f_key + s * 5;
        if (k[0] == a_hi && k[1] == a_lo && k[2] == b_hi && k[3] == b_lo && k[4] == meta)
            return i;
        i = (i + 1) & (int64_t)mask;
    }
}

void ft_rebuild_hash(int64_t ht_size, int64_t *ht, const uint64_t *f_key, int64_t n_slots) {
    for (int64_t i = 0; i < ht_size; i++) ht[i] = -1;
    for (int64_t s = 0; s < n_slots; s++) {
        const uint64_t *k = f_key + s * 5;
        ht[ht_find(ht_size, ht, f_key, k[0], k[1], k[2], k[3], k[4])] = s;
    }
}

static inline int in_nets(int64_t ver, uint64_t hi, uint64_t lo, int64_t n_nets,
                          const uint64_t *nets) {
    for (int64_t k = 0; k < n_nets; k++) {
        const uint64_t *r = nets + k * 5;
        if (r[0] == (uint64_t)ver && (hi & r[3]) == r[1] && (lo & r[4]) == r[2]) return 1;
    }
    return 0;
}

typedef struct {
    int64_t *ht; uint64_t *f_key; int64_t *f_first, *f_last, *f_term, *f_state, *f_src_a,
        *f_end, *f_n, *f_mss, *f_ws;
} flowstate;

/* Give each OK packet its flow slot and direction and append it to the packet store.
 * res = {n_slots, n_store}. */
void ft_assign(int64_t n, const int64_t *ts, const int64_t *cols, const uint64_t *addrs,
               const int64_t *frame, const int64_t *file_off, int64_t n_nets,
               const uint64_t *nets, int64_t idle, int64_t active, int64_t grace,
               int64_t ht_size, int64_t *ht, uint64_t *f_key, int64_t *f_first,
               int64_t *f_last, int64_t *f_term, int64_t *f_state, int64_t *f_src_a,
               int64_t *f_end, int64_t *f_n, int64_t *f_mss, int64_t *f_ws, int64_t *store,
               int64_t *res) {
    int64_t n_slots = res[0], n_store = res[1];
    for (int64_t i = 0; i < n; i++) {
        const int64_t *row = cols + i * N_COLS;
        if (row[C_STATUS] != 0) continue;
        int64_t t = ts[i], ver = row[C_VER], proto = row[C_PROTO];
        int64_t sp = row[C_SPORT], dp = row[C_DPORT];
        const uint64_t *ad = addrs + i * 4;
        uint64_t s_hi = ad[0], s_lo = ad[1], d_hi = ad[2], d_lo = ad[3];
        int s_is_a = 1;
        if (s_hi > d_hi || (s_hi == d_hi && (s_lo > d_lo || (s_lo == d_lo && sp > dp))))
            s_is_a = 0;
        uint64_t a_hi, a_lo, b_hi, b_lo;
        int64_t pa, pb;
        if (s_is_a) { a_hi = s_hi; a_lo = s_lo; b_hi = d_hi; b_lo = d_lo; pa = sp; pb = dp; }
        else { a_hi = d_hi; a_lo = d_lo; b_hi = s_hi; b_lo = s_lo; pa = dp; pb = sp; }
        uint64_t meta = ((uint64_t)pa << 32) | ((uint64_t)pb << 16) | ((uint64_t)proto << 8) |
                        (uint64_t)ver;
        int64_t flags = row[C_FLAGS];
        int pure_syn = proto == 6 && (flags & 0x12) == 0x02;
        int64_t h = ht_find(ht_size, ht, f_key, a_hi, a_lo, b_hi, b_lo, meta);
        int64_t s = ht[h];
        int isnew = s < 0;
        int64_t inherit = -1;
        if (!isnew) {
            if (t - f_last[s] > idle) { f_end[s] = 0; isnew = 1; }
            else if (t - f_first[s] > active) { f_end[s] = 1; isnew = 1; inherit = f_src_a[s]; }
            else if (f_term[s] >= 0) {
                if (pure_syn || t - f_term[s] > grace) {
                    f_end[s] = (f_state[s] & 4) ? 3 : 2;
                    isnew = 1;
                }
            } else if (pure_syn && (f_state[s] & 8)) { f_end[s] = 5; isnew = 1; }
        }
        if (isnew) {
            s = n_slots++;
            ht[h] = s;
            uint64_t *k = f_key + s * 5;
            k[0] = a_hi; k[1] = a_lo; k[2] = b_hi; k[3] = b_lo; k[4] = meta;
            f_first[s] = t; f_last[s] = t; f_term[s] = -1; f_state[s] = 0; f_end[s] = -1;
            f_n[s] = 0;
            f_mss[2 * s] = f_mss[2 * s + 1] = -1;
            f_ws[2 * s] = f_ws[2 * s + 1] = -1;
            if (inherit >= 0) {
                f_src_a[s] = inherit;
            } else {
                int src_is_s = 1, decided = 0;
                if (n_nets > 0) {
                    int s_in = in_nets(ver, s_hi, s_lo, n_nets, nets);
                    int d_in = in_nets(ver, d_hi, d_lo, n_nets, nets);
                    if (s_in != d_in) { src_is_s = s_in; decided = 1; }
                }
                if (!decided && proto == 6 && (flags & 0x02)) src_is_s = (flags & 0x10) == 0;
                f_src_a[s] = (src_is_s == s_is_a) ? 1 : 0;
            }
        }
        int d = (s_is_a == (f_src_a[s] == 1)) ? 0 : 1;
        if (t > f_last[s]) f_last[s] = t;
        f_n[s]++;
        if (!pure_syn) f_state[s] |= 8;
        if (proto == 6) {
            if (flags & 0x02) {
                if (row[C_MSS] >= 0 && f_mss[2 * s + d] < 0) f_mss[2 * s + d] = row[C_MSS];
                if (row[C_WS] >= 0 && f_ws[2 * s + d] < 0) f_ws[2 * s + d] = row[C_WS];
            }
            if (flags & 0x04) {
                f_state[s] |= 4;
                if (f_term[s] < 0) f_term[s] = t;
            }
            if (flags & 0x01) {
                f_state[s] |= s_is_a ? 1 : 2;
                if ((f_state[s] & 3) == 3 && f_term[s] < 0) f_term[s] = t;
            }
        }
        int64_t *st = store + n_store * S_COLS;
        st[S_SLOT] = s; st[S_TS] = t; st[S_DIR] = d; st[S_IPLEN] = row[C_IPLEN];
        st[S_IPHDR] = row[C_IPHDR]; st[S_L4HDR] = row[C_L4HDR]; st[S_PAYLEN] = row[C_PAYLEN];
        st[S_FLAGS] = flags; st[S_WIN] = row[C_WIN]; st[S_FRAME] = frame[i];
        st[S_PAYOFF] = file_off[i] + row[C_PAYOFF]; st[S_PAYCAP] = row[C_PAYCAP];
        n_store++;
    }
    res[0] = n_slots;
    res[1] = n_store;
}

/* Split the packet store: rows of done slots go, grouped by slot (counting sort, slot
 * order), column-major into em (S_COLS x n_em); the rest are compacted in place with
 * their slot renumbered by remap. counts[slot] receives packets per done slot.
 * Returns n_em. */
int64_t ft_partition(int64_t n_store, int64_t *store, int64_t n_slots, const uint8_t *done,
                     const int64_t *remap, int64_t *counts, int64_t *start, int64_t n_em_cap,
                     int64_t *em) {
    for (int64_t s = 0; s < n_slots; s++) counts[s] = 0;
    for (int64_t i = 0; i < n_store; i++) {
        int64_t s = store[i * S_COLS + S_SLOT];
        if (done[s]) counts[s]++;
    }
    int64_t acc = 0;
    for (int64_t s = 0; s < n_slots; s++) {
        start[s] = acc;
        if (done[s]) acc += counts[s];
    }
    int64_t n_em = acc, w = 0;
    if (n_em > n_em_cap) return -1;
    for (int64_t i = 0; i < n_store; i++) {
        int64_t *row = store + i * S_COLS;
        int64_t s = row[S_SLOT];
        if (done[s]) {
            int64_t p = start[s]++;
            for (int c = 0; c < S_COLS; c++) em[c * n_em + p] = row[c];
        } else {
            int64_t *dst = store + w * S_COLS;
            if (dst != row) memmove(dst, row, sizeof(int64_t) * S_COLS);
            dst[S_SLOT] = remap[s];
            w++;
        }
    }
    return n_em;
}

/* Per flow counters: out_i F x 9 (bf/uf/df packets, IP bytes, payload bytes),
 * out_t F x 4 (up first, up last, down first, down last; -1 when none). */
void ft_counters(int64_t F, const int64_t *offs, const int64_t *dirs, const int64_t *ts,
                 const int64_t *iplen, const int64_t *paylen, int64_t *out_i, int64_t *out_t) {
    for (int64_t f = 0; f < F; f++) {
        int64_t uf = -1, ul = -1, df = -1, dl = -1, nu = 0, nd = 0, bu = 0, bd = 0, pu = 0,
                pd = 0;
        for (int64_t j = offs[f]; j < offs[f + 1]; j++) {
            if (dirs[j] == 0) {
                nu++; bu += iplen[j]; pu += paylen[j];
                if (uf < 0) uf = ts[j];
                ul = ts[j];
            } else {
                nd++; bd += iplen[j]; pd += paylen[j];
                if (df < 0) df = ts[j];
                dl = ts[j];
            }
        }
        int64_t *o = out_i + f * 9;
        o[0] = nu + nd; o[1] = nu; o[2] = nd; o[3] = bu + bd; o[4] = bu; o[5] = bd;
        o[6] = pu + pd; o[7] = pu; o[8] = pd;
        int64_t *q = out_t + f * 4;
        q[0] = uf; q[1] = ul; q[2] = df; q[3] = dl;
    }
}

static void key_to_addr(uint64_t hi, uint64_t lo, int64_t ver, uint8_t *out) {
    if (ver == 4) {
        out[0] = (lo >> 24) & 255; out[1] = (lo >> 16) & 255; out[2] = (lo >> 8) & 255;
        out[3] = lo & 255;
        memset(out + 4, 0, 12);
    } else {
        for (int j = 0; j < 8; j++) {
            out[j] = (hi >> (56 - 8 * j)) & 255;
            out[8 + j] = (lo >> (56 - 8 * j)) & 255;
        }
    }
}

/* Oriented keys of the given slots. */
void ft_flow_keys(int64_t F, const int64_t *slots, const uint64_t *f_key, const int64_t *f_src_a,
                  uint8_t *src, uint8_t *dst, int64_t *sport, int64_t *dport, int64_t *proto,
                  int64_t *ver) {
    for (int64_t f = 0; f < F; f++) {
        int64_t s = slots[f];
        const uint64_t *k = f_key + s * 5;
        uint64_t meta = k[4];
        int64_t v = meta & 255, pa = (meta >> 32) & 0xFFFF, pb = (meta >> 16) & 0xFFFF;
        ver[f] = v;
        proto[f] = (meta >> 8) & 255;
        if (f_src_a[s] == 1) {
            key_to_addr(k[0], k[1], v, src + 16 * f);
            key_to_addr(k[2], k[3], v, dst + 16 * f);
            sport[f] = pa; dport[f] = pb;
        } else {
            key_to_addr(k[2], k[3], v, src + 16 * f);
            key_to_addr(k[0], k[1], v, dst + 16 * f);
            sport[f] = pb; dport[f] = pa;
        }
    }
}

/* ---- MIRAGE statistics (same estimators as analysis/stats.py) -------------------- */

static const double PCTS[9] = {10, 20, 30, 40, 50, 60, 70, 80, 90};

static inline double lerp(double a, double b, double t) {
    double d = b - a;
    return t >= 0.5 ? b - d * (1.0 - t) : a + d * t;
}
static inline double median_sorted(const double *x, int64_t n) {
    int64_t h = n / 2;
    return (n % 2) ? x[h] : (x[h - 1] + x[h]) / 2.0;
}

static void stats_sorted(const double *x, int64_t n, double *dev, double *out) {
    if (n == 0) {
        for (int k = 0; k < 17; k++) out[k] = NAN;
        return;
    }
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) total += x[i];
    double mean = total / n, m2 = 0, m3 = 0, m4 = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = x[i] - mean, d2 = d * d;
        m2 += d2; m3 += d2 * d; m4 += d2 * d2;
    }
    m2 /= n; m3 /= n; m4 /= n;
    out[0] = x[0]; out[1] = x[n - 1]; out[2] = mean; out[3] = sqrt(m2); out[4] = m2;
    double med = median_sorted(x, n);
    int64_t hi = 0;
    while (hi < n && x[hi] < med) hi++;
    int64_t lo = hi - 1, k = 0;
    while (lo >= 0 || hi < n) {
        if (hi >= n || (lo >= 0 && med - x[lo] <= x[hi] - med)) dev[k++] = med - x[lo--];
        else dev[k++] = x[hi++] - med;
    }
    out[5] = median_sorted(dev, n);
    const double eps = 2.220446049250313e-16;
    if (m2 <= (eps * mean) * (eps * mean)) {
        out[6] = 0.0;
        out[7] = -3.0;
    } else {
        double g1 = m3 / pow(m2, 1.5);
        if (n > 2) g1 = sqrt((n - 1.0) * n) / (n - 2.0) * g1;
        out[6] = g1;
        if (n > 3)
            out[7] = 1.0 / (n - 2) / (n - 3) *
                     ((n * (double)n - 1.0) * m4 / (m2 * m2) - 3 * pow(n - 1.0, 2.0));
        else
            out[7] = m4 / (m2 * m2) - 3.0;
    }
    for (int j = 0; j < 9; j++) {
        double pos = (PCTS[j] / 100.0) * (n - 1);
        int64_t i0 = (int64_t)floor(pos);
        double t = pos - i0;
        int64_t i1 = i0 + 1 < n ? i0 + 1 : n - 1;
        out[8 + j] = lerp(x[i0], x[i1], t);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static void sort_prefix(double *x, int64_t n) {
    if (n > 32) { qsort(x, (size_t)n, sizeof(double), cmp_double); return; }
    for (int64_t i = 1; i < n; i++) {
        double v = x[i];
        int64_t j = i - 1;
        while (j >= 0 && x[j] > v) { x[j + 1] = x[j]; j--; }
        x[j + 1] = v;
    }
}
static int64_t merge(const double *u, int64_t nu, const double *d, int64_t nd, double *a) {
    int64_t i = 0, j = 0, k = 0;
    while (i < nu && j < nd) a[k++] = u[i] <= d[j] ? u[i++] : d[j++];
    while (i < nu) a[k++] = u[i++];
    while (j < nd) a[k++] = d[j++];
    return k;
}

/* MIRAGE flow_features: out is F x 102 (see analysis.flowtable.stat_column). Returns 0,
 * or -1 when scratch memory could not be allocated. */
int ft_features(int64_t F, const int64_t *ts, const int64_t *dirs, const int64_t *iplen,
                const int64_t *offs, double *out) {
    int64_t max_len = 1;
    for (int64_t f = 0; f < F; f++)
        if (offs[f + 1] - offs[f] > max_len) max_len = offs[f + 1] - offs[f];
    double *a = malloc(sizeof(double) * max_len), *u = malloc(sizeof(double) * max_len),
           *d = malloc(sizeof(double) * max_len), *dev = malloc(sizeof(double) * max_len);
    if (!a || !u || !d || !dev) { free(a); free(u); free(d); free(dev); return -1; }
    for (int64_t f = 0; f < F; f++) {
        int64_t s = offs[f], e = offs[f + 1], nu = 0, nd = 0, na;
        double *row = out + f * 102;
        for (int64_t p = s; p < e; p++) {
            if (dirs[p] == 0) u[nu++] = (double)iplen[p];
            else d[nd++] = (double)iplen[p];
        }
        sort_prefix(u, nu); sort_prefix(d, nd);
        na = merge(u, nu, d, nd, a);
        stats_sorted(a, na, dev, row);
        stats_sorted(u, nu, dev, row + 17);
        stats_sorted(d, nd, dev, row + 34);
        nu = nd = 0;
        int64_t lu = 0, ld = 0;
        int su = 0, sd = 0;
        for (int64_t p = s; p < e; p++) {
            int64_t t = ts[p];
            if (dirs[p] == 0) {
                if (su) u[nu++] = (double)(t - lu) / 1e9;
                lu = t; su = 1;
            } else {
                if (sd) d[nd++] = (double)(t - ld) / 1e9;
                ld = t; sd = 1;
            }
        }
        sort_prefix(u, nu); sort_prefix(d, nd);
        na = merge(u, nu, d, nd, a);
        stats_sorted(a, na, dev, row + 51);
        stats_sorted(u, nu, dev, row + 68);
        stats_sorted(d, nd, dev, row + 85);
    }
    free(a); free(u); free(d); free(dev);
    return 0;
}

/* Stats of one array (for tests and small callers): out[17]. */
int ft_stats(int64_t n, const double *values, double *out) {
    double *x = malloc(sizeof(double) * (n ? n : 1)), *dev = malloc(sizeof(double) * (n ? n : 1));
    if (!x || !dev) { free(x); free(dev); return -1; }
    memcpy(x, values, sizeof(double) * n);
    sort_prefix(x, n);
    stats_sorted(x, n, dev, out);
    free(x); free(dev);
    return 0;
}

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastpath",
                                    "flowtruth's C fast path (called through ctypes)", -1,
                                    NULL};
PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&moddef); }
