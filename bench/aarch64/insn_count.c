/*
 * Exact executed-instruction counts for bench/aarch64.sh: a TCG plugin for qemu-user 7.2
 * (plugin API version 1; built against qemu-plugin.h from Debian's qemu source package).
 *
 *   gcc -shared -fPIC -O2 -I DIR_WITH_qemu-plugin.h insn_count.c -o libinsn_count.so
 *   qemu-aarch64 -cpu cortex-a76 -plugin ./libinsn_count.so,out=COUNTS.txt PROGRAM ARGS
 *
 * At translation every block gets a record: its number of instructions, how many of each
 * mnemonic (the first word of qemu's disassembly) and the symbol of its first instruction
 * (qemu's ELF symbol table of the main binary only: code in a dlopened library has none). An
 * execution callback adds 1 to the block's count atomically (guest threads are vCPUs that run
 * in parallel). At exit, OUT receives
 *
 *   total N
 *   mnemonic NAME N      (every mnemonic, most executed first)
 *   symbol NAME N        (every symbol, most executed first; "?" where none is known)
 *   block VADDR SYMBOL N (every block executed: its guest address, so that code qemu finds
 *                         no symbol for, such as assembly without .type/.size, can be
 *                         attributed offline from the binary's symbol table)
 *
 * A block left early (a fault) would count in full; in user mode blocks end at system calls,
 * so that does not happen in the programs measured here.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* Interned names: mnemonics and symbols, each with the instructions executed under it. */
typedef struct Name {
    char *name;
    uint64_t count;
    struct Name *next; /* in its hash bucket */
} Name;

#define BUCKETS 4096
typedef struct {
    Name *bucket[BUCKETS];
    size_t len;
} Table;

typedef struct {
    uint64_t execs;      /* executions of the block, added to atomically */
    uint64_t vaddr;
    uint32_t n_insns;
    uint32_t n_kinds;    /* distinct mnemonics in the block */
    Name *symbol;
    Name **kind;         /* n_kinds mnemonics ... */
    uint32_t *kind_n;    /* ... and how many of each */
} Block;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Table mnemonics, symbols;
static Block **blocks; /* kept for the report at exit */
static size_t n_blocks, cap_blocks;
static char *out_path;

static void *zalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) {
        abort();
    }
    return p;
}

static Name *intern(Table *t, const char *name)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *c = name; *c; c++) {
        h = (h ^ (unsigned char)*c) * 1099511628211ull;
    }
    Name **slot = &t->bucket[h % BUCKETS];
    for (Name *n = *slot; n; n = n->next) {
        if (!strcmp(n->name, name)) {
            return n;
        }
    }
    Name *n = zalloc(sizeof *n);
    n->name = strdup(name);
    n->next = *slot;
    *slot = n;
    t->len++;
    return n;
}

/*
 * Dot products by encoding: the disassembler of Debian's qemu 7.2 prints ".byte" for them
 * (Armv8.2 DotProd: SDOT/UDOT, vector and by element).
 */
static const char *dot_product(uint32_t op)
{
    if ((op & 0x9F20FC00u) == 0x0E009400u && (op >> 22 & 3) == 2) {
        return op >> 29 & 1 ? "udot" : "sdot";
    }
    if ((op & 0x9FC0F400u) == 0x0F80E000u) {
        return op >> 29 & 1 ? "udot" : "sdot";
    }
    return NULL;
}

static void on_block_exec(unsigned int vcpu_index, void *udata)
{
    Block *b = udata;
    __atomic_fetch_add(&b->execs, 1, __ATOMIC_RELAXED);
}

static void on_block_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    Block *b = zalloc(sizeof *b);
    b->n_insns = n;
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->kind = zalloc(n * sizeof *b->kind);
    b->kind_n = zalloc(n * sizeof *b->kind_n);
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        if (i == 0) {
            const char *sym = qemu_plugin_insn_symbol(insn);
            b->symbol = intern(&symbols, sym ? sym : "?");
        }
        char word[32] = "?";
        const char *dot = NULL;
        if (qemu_plugin_insn_size(insn) == 4) {
            uint32_t op;
            memcpy(&op, qemu_plugin_insn_data(insn), 4);
            dot = dot_product(op);
        }
        char *disas = dot ? NULL : qemu_plugin_insn_disas(insn);
        if (dot) {
            strcpy(word, dot);
        } else if (disas) {
            size_t len = strcspn(disas, " \t");
            if (len >= sizeof word) {
                len = sizeof word - 1;
            }
            memcpy(word, disas, len);
            word[len] = 0;
            free(disas);
        }
        Name *k = intern(&mnemonics, word);
        uint32_t j = 0;
        while (j < b->n_kinds && b->kind[j] != k) {
            j++;
        }
        if (j == b->n_kinds) {
            b->kind[b->n_kinds++] = k;
        }
        b->kind_n[j]++;
    }
    if (n_blocks == cap_blocks) {
        cap_blocks = cap_blocks ? 2 * cap_blocks : 4096;
        blocks = realloc(blocks, cap_blocks * sizeof *blocks);
        if (!blocks) {
            abort();
        }
    }
    blocks[n_blocks++] = b;
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block_exec, QEMU_PLUGIN_CB_NO_REGS, b);
}

static int by_count(const void *a, const void *b)
{
    const Name *x = *(Name *const *)a, *y = *(Name *const *)b;
    return x->count < y->count ? 1 : x->count > y->count ? -1 : strcmp(x->name, y->name);
}

static void write_names(FILE *f, const char *label, Table *t)
{
    Name **all = zalloc(t->len * sizeof *all);
    size_t len = 0;
    for (size_t i = 0; i < BUCKETS; i++) {
        for (Name *n = t->bucket[i]; n; n = n->next) {
            if (n->count) {
                all[len++] = n;
            }
        }
    }
    qsort(all, len, sizeof *all, by_count);
    for (size_t i = 0; i < len; i++) {
        fprintf(f, "%s %s %" PRIu64 "\n", label, all[i]->name, all[i]->count);
    }
    free(all);
}

static void report(qemu_plugin_id_t id, void *p)
{
    pthread_mutex_lock(&lock);
    uint64_t total = 0;
    for (size_t i = 0; i < n_blocks; i++) {
        Block *b = blocks[i];
        uint64_t e = __atomic_load_n(&b->execs, __ATOMIC_RELAXED);
        total += e * b->n_insns;
        b->symbol->count += e * b->n_insns;
        for (uint32_t j = 0; j < b->n_kinds; j++) {
            b->kind[j]->count += e * b->kind_n[j];
        }
    }
    FILE *f = out_path ? fopen(out_path, "w") : stderr;
    if (!f) {
        perror(out_path);
        f = stderr;
    }
    fprintf(f, "total %" PRIu64 "\n", total);
    write_names(f, "mnemonic", &mnemonics);
    write_names(f, "symbol", &symbols);
    for (size_t i = 0; i < n_blocks; i++) {
        Block *b = blocks[i];
        uint64_t e = __atomic_load_n(&b->execs, __ATOMIC_RELAXED);
        if (e) {
            fprintf(f, "block 0x%" PRIx64 " %s %" PRIu64 "\n", b->vaddr, b->symbol->name,
                    e * b->n_insns);
        }
    }
    if (f != stderr) {
        fclose(f);
    }
    pthread_mutex_unlock(&lock);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4)) {
            out_path = strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "insn_count: unknown option %s (only out=PATH)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_block_trans);
    qemu_plugin_register_atexit_cb(id, report, NULL);
    return 0;
}
