"""cffi build script for :mod:`xenback._barrier`.

Shared rings need real memory barriers: Python has none of its own.  The
helper is three one-line C functions that compile to the fences the Linux
kernel uses for Xen rings (``virt_mb``/``virt_rmb``/``virt_wmb``):

* x86-64 is TSO: loads are not reordered with loads, stores not with stores,
  so ``rmb``/``wmb`` only have to stop the compiler; ``mb`` must order a store
  before a later load and needs ``mfence`` (``__atomic_thread_fence`` emits a
  locked instruction with the same effect).
* arm64 is weakly ordered: ``dmb ish`` for ``mb`` (the GCC builtin emits
  it), ``dmb ishld`` for ``rmb`` and ``dmb ishst`` for ``wmb`` (written out
  as inline assembly).
* elsewhere ``rmb`` and ``wmb`` are the full fence of ``mb``.

Which ring step needs which barrier is explained in :mod:`xenback.ring`;
``tests/xenback/test_xb_barrier.py`` disassembles the built helper and checks
these fences are really there.
"""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    void xb_mb(void);
    void xb_rmb(void);
    void xb_wmb(void);
    """
)
ffibuilder.set_source(
    "xenback._barrier",
    """
    static void xb_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    #if defined(__x86_64__) || defined(__i386__)
    static void xb_rmb(void) { __asm__ __volatile__("" ::: "memory"); }
    static void xb_wmb(void) { __asm__ __volatile__("" ::: "memory"); }
    #elif defined(__aarch64__)
    static void xb_rmb(void) { __asm__ __volatile__("dmb ishld" ::: "memory"); }
    static void xb_wmb(void) { __asm__ __volatile__("dmb ishst" ::: "memory"); }
    #else
    static void xb_rmb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static void xb_wmb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    #endif
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
