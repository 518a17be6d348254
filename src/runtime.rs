//! Process-wide CPU runtime settings that the binaries (`mpcs`, the benchmarks) apply first thing
//! in `main`, before any thread exists: how freed memory is kept and which thread pool runs the
//! parallel CPU work.

/// Both settings below; call it first thing in `main`.
pub fn configure() {
    keep_freed_memory();
    one_cpu_thread_pool();
}

/// mimalloc's `mi_option_purge_delay` (the C enum's value in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Tells mimalloc (the binaries' global allocator) never to return freed memory to the OS.
/// Why: a training step frees and reallocates its activations (hundreds of MB for a ResNet-50 at
/// 224) every step; with the default 10 ms purge delay each step faults them in again, and the
/// kernel's page zeroing was half of a ResNet-50 inference profile. The resident size then stays at
/// the peak, which a training process reaches every step anyway. Call it first thing in `main`.
pub fn keep_freed_memory() {
    extern "C" {
        fn mi_option_set(option: i32, value: std::os::raw::c_long);
    }
    // Referencing the allocator type keeps the mimalloc library linked into every binary.
    let _allocator = mimalloc::MiMalloc;
    // SAFETY: mi_option_set only stores an integer option; any option/value pair is accepted.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Leaves parallel CPU work to rayon's pool alone, by giving candle's own "barrier pool" no worker
/// threads (`CANDLE_NUM_THREADS=1`, unless the user set it).
///
/// Why: candle 0.11 runs its element-wise ops (in training: mostly the gradient accumulation of
/// backprop) on a second pool whose idle workers spin for 25,000 iterations before they sleep,
/// while mpcs's kernels (convolution parts, BatchNorm, pooling, optimiser) and the GEMMs run on
/// rayon's pool. With both pools sized to the cores, the spinning workers took the cores from the
/// working ones: ResNet-18 64×64 training on 2 threads went from 84 to 115 images/s with this set
/// (notes/speed.md). It must run before candle's first element-wise op creates that pool.
pub fn one_cpu_thread_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at the start of `main`, before any other thread exists that could read the
        // environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
